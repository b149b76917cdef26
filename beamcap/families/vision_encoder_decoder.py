"""VisionEncoderDecoder (``VisionEncoderDecoderModel``, e.g. ViT + GPT-2): an image processor and a tokenizer,
no joint processor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from beamcap.families.base import Family, Processors
from beamcap.families.caches import encoder_decoder_generate


class VisionEncoderDecoder(Family):
    """A vision encoder with a text decoder: the prompt is a decoder prefix after the start token.

    Shared pass: the decoder's cross-attention keys and values are computed once per image.
    """

    name = "vision_encoder_decoder"
    model_types = frozenset({"vision-encoder-decoder"})
    shared_classes = frozenset({"VisionEncoderDecoderModel"})

    @staticmethod
    def load_processors(path: str, trust_remote_code: bool) -> Processors:
        from transformers import AutoImageProcessor, AutoTokenizer

        trust = {"trust_remote_code": trust_remote_code}
        return Processors(
            None, AutoTokenizer.from_pretrained(path, **trust), AutoImageProcessor.from_pretrained(path, **trust)
        )

    def prepare(self, images: Sequence[Image.Image], prompt: str | None) -> dict[str, torch.Tensor]:
        inputs = dict(self.image_processor(images=list(images), return_tensors="pt"))
        if prompt:
            start = self.model.config.decoder_start_token_id
            prefix = [start, *self.tokenizer(prompt, add_special_tokens=False)["input_ids"]]
            inputs["decoder_input_ids"] = torch.tensor([prefix] * len(images), dtype=torch.long)
        return inputs

    def shared_generate(self, settings: dict[str, Any], **inputs: torch.Tensor) -> torch.Tensor:
        return encoder_decoder_generate(self.model, settings, **inputs)
