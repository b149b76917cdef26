"""Chat models: any model whose processor has a chat template (LLaVA, Idefics3 / SmolVLM, Qwen2-VL, ...)."""

from __future__ import annotations

from typing import Any

import torch

from beamcap.families.base import Kind, NewTokensFamily, Processors
from beamcap.families.caches import generate_from_prefix

DEFAULT_CHAT_PROMPT = "Describe this image."


class Chat(NewTokensFamily):
    """A user turn with the image and the prompt (default ``"Describe this image."``), rendered with the chat
    template and the generation prompt; the caption is only the newly generated text, stripped: never the
    scaffold or the prompt. Decoder-only models get left padding, which batched generation needs.

    Shared pass (LLaVA): the image tokens and the prompt are read once per image, and ``generate`` continues from
    that cache.
    """

    name = "chat"
    kind = Kind.CHAT
    shared_classes = frozenset({"LlavaForConditionalGeneration"})

    @classmethod
    def claims(cls, model_config: Any, processors: Processors | None) -> bool:
        return processors is not None and bool(getattr(processors.processor, "chat_template", None))

    def __init__(self, model: Any, processors: Processors):
        super().__init__(model, processors)
        if not model.config.is_encoder_decoder and self.tokenizer is not None:
            self.tokenizer.padding_side = "left"  # batched decoder-only generation needs the prompts flush right

    def prompt_text(self, prompt: str | None) -> str:
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt or DEFAULT_CHAT_PROMPT}]}
        ]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def shared_generate(
        self,
        settings: dict[str, Any],
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prefix = {
            "input_ids": input_ids[:, :-1],
            "attention_mask": attention_mask[:, :-1],
            "pixel_values": pixel_values,
        }
        return generate_from_prefix(self.model, settings, prefix, input_ids=input_ids, attention_mask=attention_mask)
