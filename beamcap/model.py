"""A loaded image-to-text model, and one ``generate`` call on a batch of images.

Loading goes through the Auto classes (``AutoModelForImageTextToText`` and the
family's processors) under a process-wide lock: concurrent ``from_pretrained``
calls in one process are not safe. The device and dtype are resolved here, on
the worker, never on the launcher. The family (:mod:`beamcap.families`) says
how images and prompts become inputs and tokens become captions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from beamcap.config import CaptionConfig
from beamcap.devices import resolve_device, resolve_dtype
from beamcap.families import Family, family_for
from beamcap.generation import generate
from beamcap.sampling import seeded_settings
from beamcap.seeding import derive_seed
from beamcap.sources import check_model_source, resolve_model_path

_LOGGER = logging.getLogger(__name__)
_LOAD_LOCK = threading.Lock()


class PromptTooLongError(ValueError):
    """A prompt the model's context cannot hold: no smaller call can cure it."""


def context_length(model: Any) -> int | None:
    """How many positions the text model embeds (None: no fixed limit, e.g. T5's relative positions)."""
    config = model.config.get_text_config(decoder=True)
    return getattr(config, "max_position_embeddings", None)


def _image_token_id(processor: Any) -> int | None:
    token = getattr(processor, "image_token", None)
    tokenizer = getattr(processor, "tokenizer", None)
    if token is None or tokenizer is None:
        return None
    token_id = tokenizer.convert_tokens_to_ids(str(token))
    return None if token_id == tokenizer.unk_token_id else token_id


def align_image_token_id(model: Any, processor: Any) -> None:
    """Make the model look for the image token the processor actually inserts.

    The reference forces ``image_token_index = 50265`` (right only for OPT-based
    BLIP-2); beamcap reads the id from the processor's tokenizer instead.
    """
    token_id = _image_token_id(processor)
    if token_id is None:
        return
    for attr in ("image_token_id", "image_token_index"):
        current = getattr(model.config, attr, token_id)
        if current != token_id:
            _LOGGER.warning(
                "Setting model.config.%s from %s to the processor's image token id %s.", attr, current, token_id
            )
            setattr(model.config, attr, token_id)


def processor_input_size(image_processor: Any) -> int | None:
    """The largest side the image processor resizes to, when it always resizes to a fixed size."""
    size = getattr(image_processor, "size", None)
    if not getattr(image_processor, "do_resize", False) or size is None:
        return None
    if isinstance(size, int):
        return size

    def side(key: str) -> Any:
        return size.get(key) if isinstance(size, dict) else getattr(size, key, None)

    if any(side(k) for k in ("longest_edge", "max_pixels", "max_height", "max_width")):
        return None  # resolution-dependent resizing: decode in full
    sides = [v for v in (side("height"), side("width"), side("shortest_edge")) if isinstance(v, int)]
    return max(sides) if sides else None


class Captioner:
    """A loaded model with its family: captions a list of images in one ``generate`` call."""

    def __init__(self, family: Family, device: torch.device, shared_image_pass: bool = True):
        self.family = family
        self.model = family.model
        self.device = device
        self.dtype = next(self.model.parameters()).dtype
        self.shared_image_pass = shared_image_pass
        self.input_size = processor_input_size(family.image_processor)
        self.context_length = context_length(self.model)
        self.load_secs = 0.0
        self._reported: set[str] = set()
        self._report_lock = threading.Lock()

    @property
    def kind(self):
        return self.family.kind

    def prepare(self, images: Sequence[Image.Image], prompt: str | None) -> dict[str, torch.Tensor]:
        """The model's inputs on its device for these images, all with the same prompt (or none)."""
        return self.on_device(self.family.prepare(images, prompt))

    def on_device(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors moved to the model's device; floating-point ones cast to its dtype."""
        return {
            k: v.to(self.device, dtype=self.dtype) if v.is_floating_point() else v.to(self.device)
            for k, v in inputs.items()
        }

    def claim_load_report(self) -> bool:
        """True for the first caller only: whoever gets it reports this load in the metrics.

        The model may be shared by threads, DoFn instances, or (``large_model``) processes:
        asking the model itself counts each load once.
        """
        return self._first_report("load")

    def _first_report(self, what: str) -> bool:
        """True for the first caller that asks about ``what`` only (thread-safe)."""
        with self._report_lock:
            first = what not in self._reported
            self._reported.add(what)
            return first

    def info(self) -> dict[str, Any]:
        """Plain facts about the loaded model (readable through a cross-process proxy)."""
        return {
            "input_size": self.input_size,
            "load_secs": self.load_secs,
            "family": self.family.name,
            "kind": self.kind.value,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def _within_context(self, settings: dict[str, Any], length: int) -> dict[str, Any]:
        """``settings`` with ``max_new_tokens`` lowered to what the context leaves after a ``length``-token prompt
        (a decoder with no prompt still starts from one token): a caption that runs on stops at the context's end,
        as it would at ``max_new_tokens``, instead of failing its whole call past the last position embedding."""
        limit, new = self.context_length, settings.get("max_new_tokens")
        room = None if limit is None else limit - max(length, 1)
        if room is None or not isinstance(new, int) or new <= room or room < 1:
            return settings
        if self._first_report("context"):
            _LOGGER.warning(
                "max_new_tokens=%d is more than the model's context of %d positions leaves after a %d-token prompt: "
                "captions stop at %d new tokens.", new, limit, length, room
            )  # fmt: skip
        return {**settings, "max_new_tokens": room}

    def caption(
        self,
        images: Sequence[Image.Image],
        prompt: str | None,
        settings: dict[str, Any],
        seeds: Sequence[int] | None = None,
    ) -> list[list[str]]:
        """One ``generate`` call: ``num_return_sequences`` candidates for each image.

        With ``seeds`` (one per image) and plain sampling, each candidate is
        drawn from its own seeded stream, so captions do not depend on the
        other images of the call.
        """
        inputs = self.prepare(images, prompt)
        length = max((inputs[k].shape[1] for k in ("input_ids", "decoder_input_ids") if k in inputs), default=0)
        limit = self.context_length
        if limit is not None and length > limit:
            raise PromptTooLongError(
                f"the prompt is {length} tokens (with its image tokens and template), longer than the model's "
                f"context of {limit} positions: shorten the prompt"
            )
        settings = self._within_context(settings, length)
        n = settings.get("num_return_sequences", 1)
        if seeds is not None and settings.get("do_sample") and settings.get("num_beams", 1) == 1:
            row_seeds = [derive_seed(seed, candidate) for seed in seeds for candidate in range(n)]
            settings = seeded_settings(self.model, settings, row_seeds)
        try:
            with torch.inference_mode():
                sequences = generate(self.family, inputs, settings, shared=self.shared_image_pass)
        except IndexError as e:  # an embedding lookup past the last position
            new = settings.get("max_new_tokens", 0)
            if limit is None or length + new <= limit:
                raise
            raise PromptTooLongError(
                f"generation ran past the model's context of {limit} positions (a {length}-token prompt plus up to "
                f"{new} new tokens): lower max_new_tokens or shorten the prompt"
            ) from e
        input_ids = inputs.get("input_ids")
        texts = self.family.decode(sequences, input_ids.shape[1] if input_ids is not None else 0)
        return [texts[i * n : (i + 1) * n] for i in range(len(images))]


def load_captioner(config: CaptionConfig) -> Captioner:
    """Load processors and model for ``config`` onto the resolved device."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    check_model_source(config.hf_img2seq)
    path = resolve_model_path(config.hf_img2seq)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.torch_dtype, device)
    trust = {"trust_remote_code": config.trust_remote_code}
    with _LOAD_LOCK:
        start = time.perf_counter()
        _LOGGER.info("Loading %s on %s (dtype %s).", path, device, dtype)
        model_config = AutoConfig.from_pretrained(path, **trust)
        processors = family_for(model_config, None).load_processors(path, config.trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **trust)
        model.to(device).eval()
        if processors.processor is not None:
            align_image_token_id(model, processors.processor)
        family = family_for(model_config, processors)(model, processors)
        captioner = Captioner(family, device, config.shared_image_pass)
        captioner.load_secs = time.perf_counter() - start
    _LOGGER.info(
        "Loaded %s in %.1f s: family %s, %s on %s.", path, captioner.load_secs, family.name, captioner.dtype, device
    )
    return captioner
