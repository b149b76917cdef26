"""The transform's configuration: the reference operator's parameters plus beamcap's extras.

One frozen dataclass, validated when it is built (on the launcher), with
errors that name the parameter and what to change. Nothing here touches
torch, a model or a device.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from beamcap.dj_format import DEFAULT_EOC_TOKEN, DEFAULT_IMAGE_TOKEN, SpecialTokens
from beamcap.images import DEFAULT_MAX_IMAGE_PIXELS
from beamcap.retention import KeepMode, generated_per_sample

_LOGGER = logging.getLogger(__name__)

DEFAULT_MODEL = "Salesforce/blip2-opt-2.7b"
DTYPES = ("auto", "float32", "float16", "bfloat16")
_DEVICE_RE = re.compile(r"^(cpu|mps|(cuda|xpu)(:\d+)?)$")
# Keys that beamcap sets itself on every generate call.
_RESERVED_GENERATE_KEYS = frozenset(
    {"num_return_sequences", "pixel_values", "input_ids", "attention_mask", "inputs", "generation_config"}
)


def _check_type(name: str, value: Any, types: type | tuple[type, ...], what: str) -> None:
    # bool is an int in Python; refuse it where a count is meant.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ValueError(f"{name} must be {what}, got the bool {value!r}")
    if not isinstance(value, types):
        raise ValueError(f"{name} must be {what}, got {type(value).__name__} {value!r}")


def _check_positive_int(name: str, value: Any) -> None:
    _check_type(name, value, int, "a positive int")
    if value < 1:
        raise ValueError(f"{name} must be a positive int (>= 1), got {value!r}")


def _dtype_name(value: Any) -> str | None:
    """Accept a torch.dtype or its name without importing torch here."""
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"torch_dtype must be None or one of {list(DTYPES)} (or the torch.dtype), got {value!r}")
    return name


@dataclass(frozen=True)
class CaptionConfig:
    """Everything :class:`beamcap.CaptionImages` needs, validated.

    The first eight fields are Data-Juicer's ``image_captioning_mapper``
    parameters, with its names, order and defaults. See README.md for each.
    """

    hf_img2seq: str = DEFAULT_MODEL
    trust_remote_code: bool = False
    caption_num: int = 1
    keep_candidate_mode: KeepMode = KeepMode.RANDOM_ANY
    keep_original_sample: bool = True
    prompt: str | None = None
    prompt_key: str | None = None
    gpu_batch_size: int = 8
    # keyword-only extras
    text_key: str = "text"
    image_key: str = "images"
    image_token: str = DEFAULT_IMAGE_TOKEN
    eoc_token: str = DEFAULT_EOC_TOKEN
    max_new_tokens: int = 128
    do_sample: bool = True
    seed: int | None = None
    device: str | None = None
    torch_dtype: str | None = None
    image_root: str | None = None
    image_base_dir: str | None = None
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_input_pixels: int | None = None
    min_batch_size: int = 1
    max_batch_size: int | None = None
    large_model: bool = False
    model_copies: int | None = None
    max_batch_duration_secs: float | None = None
    streaming_shards: int = 1
    prefetch_images: bool = False
    generate_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise values in place once
        for name in ("hf_img2seq", "image_root", "image_base_dir"):  # pathlib paths are accepted
            if hasattr(getattr(self, name), "__fspath__"):
                set_(self, name, os.fspath(getattr(self, name)))
        _check_type("hf_img2seq", self.hf_img2seq, str, "a model id or a local folder path (str)")
        if not self.hf_img2seq:
            raise ValueError(
                "hf_img2seq must not be empty: give a hub model id, a save_pretrained folder or 'beamcap-demo'"
            )
        _check_type("trust_remote_code", self.trust_remote_code, bool, "a bool")
        _check_positive_int("caption_num", self.caption_num)
        valid_modes = [m.value for m in KeepMode]
        try:
            set_(self, "keep_candidate_mode", KeepMode(self.keep_candidate_mode))
        except ValueError:
            raise ValueError(
                f"keep_candidate_mode must be one of {valid_modes}, got {self.keep_candidate_mode!r}"
            ) from None
        _check_type("keep_original_sample", self.keep_original_sample, bool, "a bool")
        _check_type("prompt", self.prompt, (str, type(None)), "a str or None")
        _check_type("prompt_key", self.prompt_key, (str, type(None)), "a str (a field name) or None")
        _check_positive_int("gpu_batch_size", self.gpu_batch_size)
        for name in ("text_key", "image_key", "image_token", "eoc_token"):
            _check_type(name, getattr(self, name), str, "a non-empty str")
            if not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty str")
        if self.image_token == self.eoc_token:
            raise ValueError("image_token and eoc_token must differ")
        _check_positive_int("max_new_tokens", self.max_new_tokens)
        _check_type("do_sample", self.do_sample, bool, "a bool")
        _check_type("seed", self.seed, (int, type(None)), "an int or None")
        _check_type("device", self.device, (str, type(None)), "None (auto), 'cpu', 'cuda', 'cuda:N', 'xpu' or 'mps'")
        if self.device is not None and not _DEVICE_RE.match(self.device):
            raise ValueError(
                f"device must be None (auto), 'cpu', 'cuda', 'cuda:N', 'xpu' or 'mps', got {self.device!r}"
            )
        set_(self, "torch_dtype", _dtype_name(self.torch_dtype))
        _check_type("image_root", self.image_root, (str, type(None)), "a folder path (str) or None")
        _check_type("image_base_dir", self.image_base_dir, (str, type(None)), "a folder path (str) or None")
        _check_positive_int("max_image_pixels", self.max_image_pixels)
        if self.max_input_pixels is not None:
            _check_positive_int("max_input_pixels", self.max_input_pixels)
        _check_positive_int("min_batch_size", self.min_batch_size)
        if self.max_batch_size is not None:
            _check_positive_int("max_batch_size", self.max_batch_size)
            if self.max_batch_size < self.min_batch_size:
                raise ValueError(
                    f"max_batch_size ({self.max_batch_size}) must be >= min_batch_size ({self.min_batch_size})"
                )
        elif self.min_batch_size > self.gpu_batch_size:
            raise ValueError(
                f"min_batch_size ({self.min_batch_size}) must be <= the batch bound (gpu_batch_size "
                f"{self.gpu_batch_size}); raise max_batch_size too"
            )
        _check_type("large_model", self.large_model, bool, "a bool")
        if self.model_copies is not None:
            _check_positive_int("model_copies", self.model_copies)
        if self.max_batch_duration_secs is not None:
            duration = self.max_batch_duration_secs
            if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not 0 < duration < float("inf"):
                raise ValueError(
                    f"max_batch_duration_secs must be a number of seconds > 0 (or None: no time bound), "
                    f"got {duration!r}"
                )
        _check_positive_int("streaming_shards", self.streaming_shards)
        _check_type("prefetch_images", self.prefetch_images, bool, "a bool")
        _check_type("generate_kwargs", self.generate_kwargs, dict, "a dict of generate() arguments")
        set_(self, "generate_kwargs", dict(self.generate_kwargs))
        reserved = sorted(_RESERVED_GENERATE_KEYS & self.generate_kwargs.keys())
        if reserved:
            raise ValueError(
                f"{reserved} are set by beamcap on every generate call and cannot be passed; "
                "use caption_num for the number of candidates"
            )
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

    @property
    def shares_across_processes(self) -> bool:
        """One model (or model_copies models) per machine, shared by every SDK worker process."""
        return self.large_model or self.model_copies is not None

    @property
    def special_tokens(self) -> SpecialTokens:
        return SpecialTokens(image=self.image_token, eoc=self.eoc_token)

    @property
    def generated_per_sample(self) -> int:
        return generated_per_sample(self.keep_candidate_mode, self.caption_num)

    @property
    def batch_bounds(self) -> tuple[int, int]:
        """(min, max) batch weight for BatchElements, in images."""
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
        """The prompt of every image of ``sample`` (SPEC: prompt_key's field when a str, else prompt)."""
        if self.prompt_key is not None:
            value = sample.get(self.prompt_key)
            if isinstance(value, str):
                return value
        # As the reference: an empty global prompt means no prompt.
        return self.prompt or None
