"""The transform's configuration: the reference operator's parameters plus beamcap's extras.

Every parameter is declared once, here, as a field of :class:`CaptionConfig`
made by :func:`param`: its type, default, one line of help, its valid values
and its check. Everything else is derived from that declaration: the job's
command-line flags (``pipelines/options.py``), the parameter table in
README.md (:func:`markdown_table`, kept equal by a test), and the
``CaptionImages`` docstring. A test proves the transform's signature equals
the fields.

The config is frozen and validated when it is built (on the launcher), with
errors that name the parameter and what to change. Nothing here touches torch,
a model or a device.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from beamcap.dj_format import DEFAULT_EOC_TOKEN, DEFAULT_IMAGE_TOKEN, SpecialTokens
from beamcap.images import (
    DEFAULT_DOWNLOAD_TIMEOUT_SECS,
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
)
from beamcap.retention import KeepMode

_LOGGER = logging.getLogger(__name__)

DEFAULT_MODEL = "Salesforce/blip2-opt-2.7b"
DTYPES = ("auto", "float32", "float16", "bfloat16")
_DEVICE_RE = re.compile(r"^(cpu|mps|(cuda|xpu)(:\d+)?)$")
# Keys that beamcap sets itself on every generate call.
_RESERVED_GENERATE_KEYS = frozenset(
    {"num_return_sequences", "pixel_values", "input_ids", "attention_mask", "inputs", "generation_config"}
)
# Common generate arguments, checked when the transform is built rather than failing every batch at its first
# generate call, as transformers' logits processors check them: name -> (an int, or any real number, stored as a
# float as transformers wants it; the test the value must pass; what the test says; whether it only matters when
# sampling, so that transformers ignores it, with a warning, under do_sample=False). Others pass unchecked.
_GENERATE_ARG_CHECKS: dict[str, tuple[type, Callable[[Any], bool], str, bool]] = {
    "num_beams": (int, lambda v: v >= 1, "a positive int", False),
    "no_repeat_ngram_size": (int, lambda v: v >= 0, "an int >= 0", False),
    "min_new_tokens": (int, lambda v: v >= 0, "an int >= 0", False),
    "length_penalty": (float, math.isfinite, "a finite number", False),
    "repetition_penalty": (float, lambda v: 0 < v < math.inf, "a finite number > 0", False),
    "top_k": (int, lambda v: v >= 0, "an int >= 0", True),
    "top_p": (float, lambda v: 0 <= v <= 1, "a number in [0, 1]", True),
    "temperature": (float, lambda v: 0 < v < math.inf, "a finite number > 0", True),
}
# Parameters that existed once and were removed, with why (an old call fails with this, not as a generate kwarg).
_REMOVED = {
    "prefetch_images": "prefetch_images was removed: reading images is under 1% of the time on the models measured "
    "(0.94-1.05x with it on); drop the argument",
}


# --- checks: each raises ValueError naming the parameter and what is valid --------------------------------------


def _type_error(name: str, value: Any, what: str) -> ValueError:
    got = f"the bool {value!r}" if isinstance(value, bool) else f"{type(value).__name__} {value!r}"
    return ValueError(f"{name} must be {what}, got {got}")


def is_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _type_error(name, value, "a bool")


def is_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):  # bool is an int in Python; refuse it as a count
        raise _type_error(name, value, "a positive int")
    if value < 1:
        raise ValueError(f"{name} must be a positive int (>= 1), got {value!r}")


def is_positive_seconds(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")


def is_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(name, value, "an int")


def is_str(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise _type_error(name, value, "a str")


def is_non_empty_str(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty str, got {value!r}")


def is_model(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise _type_error(name, value, "a model id or a local folder path (str)")
    if not value:
        raise ValueError(f"{name} must not be empty: give a hub model id, a save_pretrained folder or 'beamcap-demo'")


def is_device(name: str, value: Any) -> None:
    if not isinstance(value, str) or not _DEVICE_RE.match(value):
        raise ValueError(f"{name} must be None (auto), 'cpu', 'cuda', 'cuda:N', 'xpu' or 'mps', got {value!r}")


def is_dict(name: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise _type_error(name, value, "a dict of generate() arguments")


def is_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def param(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002 - argparse's word
    *,
    check: Callable[[str, Any], None] | None = None,
    choices: tuple[str, ...] | None = None,
    resolves: str | None = None,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """Declare one parameter: its default, its help line, its check and, where it has them, its valid values.

    ``check`` runs on every value but ``None`` (``None`` is valid wherever the default is ``None``).
    ``resolves`` says what a ``None`` default turns into on the worker (shown in ``--help`` and README.md).
    """
    metadata = {"help": help, "check": check, "choices": choices, "resolves": resolves}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class CaptionConfig:
    """Everything :class:`beamcap.CaptionImages` needs, validated.

    The first eight fields are Data-Juicer's ``image_captioning_mapper``
    parameters, with its names, order and defaults; the rest are keyword-only
    in the transform. ``docs/behaviour.md`` says what each one does.
    """

    # The reference operator's parameters, in its order.
    hf_img2seq: str = param(
        DEFAULT_MODEL,
        "hub id, a save_pretrained folder (local or on a Beam filesystem), or 'beamcap-demo' (the bundled demo model). "
        "The default is the reference's BLIP-2 with OPT-2.7b, a 15 GB download; "
        "Salesforce/blip-image-captioning-base (1 GB) is a smaller choice",
        check=is_model,
    )
    trust_remote_code: bool = param(
        False, "passed to every from_pretrained (model, processor, tokenizer)", check=is_bool
    )
    caption_num: int = param(1, "candidates generated per image", check=is_positive_int)
    keep_candidate_mode: KeepMode = param(
        KeepMode.RANDOM_ANY,
        "which candidates become generated samples: one at random, the one whose SimHash is closest to the chunk's "
        "text, or all of them (caption_num generated samples)",
        choices=tuple(m.value for m in KeepMode),
    )
    keep_original_sample: bool = param(True, "also emit each input sample", check=is_bool)
    prompt: str | None = param(None, "one prompt for every image", check=is_str)
    prompt_key: str | None = param(
        None, "field holding a per-sample prompt; used when it holds a str, else prompt is used", check=is_str
    )
    gpu_batch_size: int = param(8, "most images in one generate call", check=is_positive_int)
    # Keyword-only extras.
    text_key: str = param("text", "the sample's text field", check=is_non_empty_str)
    image_key: str = param("images", "the sample's field with the list of image references", check=is_non_empty_str)
    image_token: str = param(DEFAULT_IMAGE_TOKEN, "the dataset's image token", check=is_non_empty_str)
    eoc_token: str = param(DEFAULT_EOC_TOKEN, "the dataset's end-of-chunk token", check=is_non_empty_str)
    max_new_tokens: int = param(
        128,
        "most tokens generated per caption (the reference's 128); fewer where the model's context ends first",
        check=is_positive_int,
    )
    do_sample: bool = param(
        True,
        "sample captions (the reference's True); false: greedy, or beam search with num_beams=caption_num "
        "when caption_num > 1",
        check=is_bool,
    )
    seed: int | None = param(
        None,
        "makes captions and random_any choices a function of (seed, sample): the same on retries and under any "
        "batching",
        check=is_int,
    )
    device: str | None = param(
        None,
        "'cpu', 'cuda', 'cuda:N', 'xpu' or 'mps'",
        check=is_device,
        resolves="cuda when a GPU is visible on the worker, else cpu",
    )
    torch_dtype: str | None = param(
        None,
        "the weights' dtype",
        choices=DTYPES,
        resolves="bfloat16 on CUDA (float16 where bf16 is unsupported); on CPU, bfloat16 where it is faster than "
        "float32 (AMX-BF16 on x86, BF16 on Arm), else float32",
    )
    image_root: str | None = param(
        None,
        "relative image paths resolve under this folder, and nothing outside it is read (.., other absolute paths, "
        "symlinks out, URLs)",
        check=is_str,
    )
    image_base_dir: str | None = param(
        None,
        "relative image paths resolve against it (a local folder or any Beam filesystem); nothing is refused",
        check=is_str,
    )
    max_image_pixels: int = param(
        DEFAULT_MAX_IMAGE_PIXELS,
        "images declaring more pixels are refused before decoding (default: Pillow's limit)",
        check=is_positive_int,
    )
    max_aspect_ratio: int = param(
        DEFAULT_MAX_ASPECT_RATIO,
        "images whose long side is more than this many times their short side are refused before decoding "
        "(processors that scale the short side up, such as CLIP's in GIT and LLaVA, would blow them up); raise it "
        "for models that resize to a fixed square, such as BLIP",
        check=is_positive_int,
    )
    max_image_bytes: int = param(
        DEFAULT_MAX_IMAGE_BYTES,
        "images larger than this many bytes (local file, Beam filesystem or URL) are refused without reading on",
        check=is_positive_int,
    )
    download_timeout_secs: float = param(
        DEFAULT_DOWNLOAD_TIMEOUT_SECS,
        "the longest one http(s) image download may take, all of it (not per socket read)",
        check=is_positive_seconds,
    )
    max_input_pixels: int | None = param(
        None,
        "larger images are downscaled (aspect kept) before the processor: bounds the cost of models whose input "
        "grows with resolution",
        check=is_positive_int,
    )
    min_batch_size: int = param(1, "least images BatchElements gathers before captioning", check=is_positive_int)
    max_batch_size: int | None = param(
        None,
        "most images BatchElements gathers; each gathered batch is cut into generate calls of one prompt and at most "
        "gpu_batch_size images",
        check=is_positive_int,
        resolves="gpu_batch_size",
    )
    large_model: bool = param(
        False,
        "one model per machine, shared by every SDK worker process (as RunInference's large_model)",
        check=is_bool,
    )
    model_copies: int | None = param(
        None,
        "N models per machine, shared by the worker processes, used in turn batch by batch (implies large_model)",
        check=is_positive_int,
    )
    max_batch_duration_secs: float | None = param(
        None,
        "streaming only: the longest a sample waits for its batch to fill",
        check=is_positive_seconds,
    )
    streaming_shards: int = param(
        1,
        "streaming only, with max_batch_duration_secs: keys the waiting samples are spread over (about one per worker)",
        check=is_positive_int,
    )
    shared_image_pass: bool = param(
        True,
        "compute each image's share of the work once for all its candidates (the same tokens as generate; only on the "
        "tested transformers versions); false: plain generate",
        check=is_bool,
    )
    generate_kwargs: dict[str, Any] = param(
        help="more generate arguments (num_beams, top_p, repetition_penalty, ...); the common ones are checked when "
        "the transform is built",
        check=is_dict,
        factory=dict,
    )

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise values in place once
        for name in ("hf_img2seq", "image_root", "image_base_dir"):  # pathlib paths are accepted
            if hasattr(getattr(self, name), "__fspath__"):
                set_(self, name, os.fspath(getattr(self, name)))
        set_(self, "keep_candidate_mode", _keep_mode(self.keep_candidate_mode))
        set_(self, "torch_dtype", _dtype_name(self.torch_dtype))
        for spec in dataclasses.fields(self):
            value, check = getattr(self, spec.name), spec.metadata["check"]
            if check is not None and value is not None:
                check(spec.name, value)
            elif value is None and spec.default is not None:
                raise ValueError(f"{spec.name} must not be None")
        set_(self, "generate_kwargs", dict(self.generate_kwargs))
        self._check_together()

    def _check_together(self) -> None:
        """Checks that involve more than one parameter."""
        if self.image_token == self.eoc_token:
            raise ValueError("image_token and eoc_token must differ")
        if self.max_batch_size is not None and self.max_batch_size < self.min_batch_size:
            raise ValueError(
                f"max_batch_size ({self.max_batch_size}) must be >= min_batch_size ({self.min_batch_size})"
            )
        if self.max_batch_size is None and self.min_batch_size > self.gpu_batch_size:
            raise ValueError(
                f"min_batch_size ({self.min_batch_size}) must be <= the batch bound (gpu_batch_size "
                f"{self.gpu_batch_size}); raise max_batch_size too"
            )
        removed = sorted(_REMOVED.keys() & self.generate_kwargs.keys())
        if removed:
            raise ValueError(_REMOVED[removed[0]])
        reserved = sorted(_RESERVED_GENERATE_KEYS & self.generate_kwargs.keys())
        if reserved:
            raise ValueError(
                f"{reserved} are set by beamcap on every generate call and cannot be passed; "
                "use caption_num for the number of candidates"
            )
        self._check_generate_kwargs()
        num_beams = self.generate_kwargs.get("num_beams")
        if not self.do_sample and self.caption_num > 1 and num_beams is not None and num_beams < self.caption_num:
            raise ValueError(
                f"do_sample=False with caption_num={self.caption_num} needs num_beams >= caption_num "
                f"(got num_beams={num_beams}): greedy decoding has a single candidate. Raise num_beams, "
                "leave it unset (beamcap then uses num_beams=caption_num), or set do_sample=True"
            )
        if self.prompt and self.prompt_key:
            _LOGGER.warning(
                "Both prompt and prompt_key are set: a sample's %r field is used when it is a str, else the prompt %r.",
                self.prompt_key,
                self.prompt,
            )

    def _check_generate_kwargs(self) -> None:
        """Check the common generate arguments (:data:`_GENERATE_ARG_CHECKS`); real numbers are stored as floats."""
        for key, (kind, test, what, sampling_only) in _GENERATE_ARG_CHECKS.items():
            value = self.generate_kwargs.get(key)
            if value is None or (sampling_only and not self.do_sample):
                continue
            wanted = numbers.Integral if kind is int else numbers.Real
            if isinstance(value, bool) or not isinstance(value, wanted) or not test(value):
                raise ValueError(f"generate_kwargs {key} must be {what}, got {value!r}")
            self.generate_kwargs[key] = kind(value)

    @property
    def shares_across_processes(self) -> bool:
        """One model (or model_copies models) per machine, shared by every SDK worker process."""
        return self.large_model or self.model_copies is not None

    @property
    def special_tokens(self) -> SpecialTokens:
        return SpecialTokens(image=self.image_token, eoc=self.eoc_token)

    @property
    def batch_bounds(self) -> tuple[int, int]:
        """(min, max) images BatchElements gathers."""
        return self.min_batch_size, self.max_batch_size or self.gpu_batch_size

    def generation_settings(self) -> dict[str, Any]:
        """Keyword arguments for every ``generate`` call (beside the inputs)."""
        settings: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        settings.update(self.generate_kwargs)
        settings["num_return_sequences"] = self.caption_num
        if not self.do_sample and self.caption_num > 1:
            settings.setdefault("num_beams", self.caption_num)
        return settings

    def prompt_for(self, sample: dict) -> str | None:
        """The prompt of every image of ``sample``: prompt_key's field when it is a str, else prompt."""
        if self.prompt_key is not None:
            value = sample.get(self.prompt_key)
            if isinstance(value, str):
                return value
        # As the reference: an empty global prompt means no prompt.
        return self.prompt or None


def _keep_mode(value: Any) -> KeepMode:
    try:
        return KeepMode(value)
    except ValueError:
        raise ValueError(f"keep_candidate_mode must be one of {[m.value for m in KeepMode]}, got {value!r}") from None


def _dtype_name(value: Any) -> str | None:
    """Accept a torch.dtype or its name without importing torch here."""
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"torch_dtype must be None or one of {list(DTYPES)} (or the torch.dtype), got {value!r}")
    return name


# --- what the declarations give the rest of the project ----------------------------------------------------------

REFERENCE_PARAMETERS = 8
"""The first eight fields are the reference operator's (positional in the transform); the rest are keyword-only."""


@dataclass(frozen=True)
class Parameter:
    """One declared parameter, as the CLI, README.md and the transform's docstring see it."""

    name: str
    type: Any  # the resolved annotation, e.g. int | None
    default: Any
    help: str
    choices: tuple[str, ...] | None
    resolves: str | None

    @property
    def value_type(self) -> type:
        """The type a non-None value has (``int`` for ``int | None``)."""
        base = self.type
        if typing.get_origin(base) in (typing.Union, types.UnionType):
            base = next(a for a in typing.get_args(base) if a is not type(None))
        return typing.get_origin(base) or base

    @property
    def shown_default(self) -> str:
        """The default as README.md and --help show it."""
        default = self.default.value if isinstance(self.default, KeepMode) else self.default
        return repr(default)


def parameters() -> list[Parameter]:
    """Every parameter of :class:`CaptionConfig`, in order."""
    hints = typing.get_type_hints(CaptionConfig)
    result = []
    for spec in dataclasses.fields(CaptionConfig):
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        meta = spec.metadata
        result.append(Parameter(spec.name, hints[spec.name], default, meta["help"], meta["choices"], meta["resolves"]))
    return result


def describe(p: Parameter) -> str:
    """One sentence on a parameter: its help, its valid values and what its None default resolves to."""
    text = p.help
    if p.choices:
        text += f" ({', '.join(repr(c) for c in p.choices)})"
    if p.resolves:
        text += f"; default: {p.resolves}"
    return text


def markdown_table() -> str:
    """README.md's parameter table, made from the declarations (a test keeps the README equal to it)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")  # a table cell's | must be escaped, in code spans too

    rows = ["| parameter | default | meaning |", "|---|---|---|"]
    for p in parameters():
        name = f"`**{p.name}`" if p.name == "generate_kwargs" else f"`{p.name}`"
        default = "" if p.name == "generate_kwargs" else f"`{cell(p.shown_default)}`"
        rows.append(f"| {name} | {default} | {cell(describe(p))} |")
    return "\n".join(rows)


def args_docstring() -> str:
    """The transform's ``Args:`` section, made from the declarations."""
    lines = ["Args:"]
    for p in parameters():
        name = "**generate_kwargs" if p.name == "generate_kwargs" else p.name
        lines.append(f"    {name}: {describe(p)}.")
    return "\n".join(lines)
