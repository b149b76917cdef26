"""Florence-2 (``Florence2ForConditionalGeneration``): a DaViT encoder and BART, prompted with task tokens."""

from __future__ import annotations

from typing import Any

import torch

from beamcap.families.base import Kind, NewTokensFamily
from beamcap.families.caches import encoder_decoder_generate

DEFAULT_TASK_PROMPT = "<CAPTION>"


class Florence2(NewTokensFamily):
    """Florence-2: the prompt is a task token, ``<CAPTION>`` by default (``<DETAILED_CAPTION>``,
    ``<MORE_DETAILED_CAPTION>`` through ``prompt``); the caption is the decoded output, stripped.
    ``post_process_generation`` is not applied: for the caption tasks the decoded text is the caption.

    Shared pass: the decoder's cross-attention keys and values are computed once per image.
    """

    name = "florence2"
    kind = Kind.TASK
    model_types = frozenset({"florence2"})
    shared_classes = frozenset({"Florence2ForConditionalGeneration"})

    def prompt_text(self, prompt: str | None) -> str:
        return prompt or DEFAULT_TASK_PROMPT

    def shared_generate(self, settings: dict[str, Any], **inputs: torch.Tensor) -> torch.Tensor:
        return encoder_decoder_generate(self.model, settings, **inputs)
