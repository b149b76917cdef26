"""What every model family shares: its kind of prompting, and the defaults each family module overrides.

A family says how its models are prompted (:class:`Kind`), how their
processors are loaded, how a batch of images becomes the model's inputs, how
generated tokens become captions, and, for the model classes it has been
tested on, how ``generate`` is run with each image's work shared by its
candidates. :class:`Family` itself is the generic prefix family: any
image-to-text model whose processor takes images and an optional text prefix.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import torch
from PIL import Image


class Kind(str, Enum):
    """How a model wants its prompt, and what of its output is the caption."""

    PREFIX = "prefix"
    """The prompt is a text prefix (BLIP, BLIP-2, GIT, PaliGemma, VisionEncoderDecoder); the caption is the whole
    output decoded with special tokens skipped (the reference's rule: a BLIP prompt starts the caption)."""
    CHAT = "chat"
    """The processor has a chat template: the prompt is a user turn with the image; the caption is the new text."""
    TASK = "task"
    """Florence-2-style task tokens (``<CAPTION>``); the caption is the decoded output, stripped."""


@dataclass(frozen=True)
class Processors:
    """What turns images and text into a model's inputs, and tokens back into text."""

    processor: Any | None  # None for models loaded with a separate image processor and tokenizer
    tokenizer: Any | None
    image_processor: Any | None


class Family:
    """The generic prefix family, and the base every family module subclasses.

    Class attributes:
        name: the family's name in logs and tests.
        kind: how its models are prompted.
        model_types: the ``config.model_type`` values it claims.
        shared_classes: the exact transformers classes whose ``generate`` :meth:`shared_generate` reproduces
            (tested token for token); other classes of the family, subclasses and remote code run
            ``model.generate``.
    """

    name: ClassVar[str] = "prefix"
    kind: ClassVar[Kind] = Kind.PREFIX
    model_types: ClassVar[frozenset[str]] = frozenset()
    shared_classes: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def claims(cls, model_config: Any, processors: Processors | None) -> bool:
        """Whether this family handles a model with this config and these processors (None: not loaded yet)."""
        return model_config.model_type in cls.model_types

    @staticmethod
    def load_processors(path: str, trust_remote_code: bool) -> Processors:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        return Processors(processor, getattr(processor, "tokenizer", None), getattr(processor, "image_processor", None))

    def __init__(self, model: Any, processors: Processors):
        self.model = model
        self.processor = processors.processor
        self.tokenizer = processors.tokenizer
        self.image_processor = processors.image_processor
        self._accepts = set(inspect.signature(model.forward).parameters)

    @property
    def has_shared_pass(self) -> bool:
        """Whether :meth:`shared_generate` covers this model's exact class."""
        cls = type(self.model)
        return cls.__name__ in self.shared_classes and cls.__module__.startswith("transformers.models.")

    def prompt_text(self, prompt: str | None) -> str | None:
        """The text input for one image (None: images only)."""
        return prompt

    def prepare(self, images: Sequence[Image.Image], prompt: str | None) -> dict[str, torch.Tensor]:
        """The model's inputs (on the CPU) for these images, all with the same prompt (or none)."""
        text = self.prompt_text(prompt)
        texts = None if text is None else [text] * len(images)
        padding = {"padding": True} if self.kind is Kind.CHAT else {}
        inputs = dict(self.processor(images=list(images), text=texts, return_tensors="pt", **padding))
        if "token_type_ids" in inputs and "token_type_ids" not in self._accepts:
            del inputs["token_type_ids"]
        return inputs

    def decode(self, sequences: torch.Tensor, input_length: int) -> list[str]:
        """Generated token ids to text, special tokens skipped: the whole output (the reference's rule)."""
        return (self.processor or self.tokenizer).batch_decode(sequences, skip_special_tokens=True)

    def shared_generate(self, settings: dict[str, Any], **inputs: torch.Tensor) -> torch.Tensor:
        """``model.generate(**inputs, **settings)`` with each image's work done once for all its candidates.

        Called only when :attr:`has_shared_pass` and the call samples one beam per candidate with a dynamic
        cache on unpadded rows (see :mod:`beamcap.generation`).
        """
        raise NotImplementedError(f"{self.name} has no shared image pass")


class NewTokensFamily(Family):
    """A family whose caption is only the newly generated text, stripped (chat and task prompts)."""

    def decode(self, sequences: torch.Tensor, input_length: int) -> list[str]:
        if not self.model.config.is_encoder_decoder:
            sequences = sequences[:, input_length:]  # a decoder-only model's output starts with its prompt
        decoder = self.processor or self.tokenizer
        return [text.strip() for text in decoder.batch_decode(sequences, skip_special_tokens=True)]
