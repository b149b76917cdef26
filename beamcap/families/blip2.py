"""BLIP-2 (``Blip2ForConditionalGeneration``): a Q-Former prefix in front of an OPT or a T5 language model."""

from __future__ import annotations

from typing import Any

import torch

from beamcap.families.base import Family
from beamcap.families.caches import encoder_decoder_generate, generate_from_prefix


class Blip2(Family):
    """BLIP-2: the prompt is a text prefix after the image's query tokens, and the caption starts with it.

    Shared pass: with a decoder-only language model (OPT), the image tokens and the prompt are read once per image
    and ``generate`` continues from that cache; with T5, the decoder's cross-attention keys and values are
    computed once per image.
    """

    name = "blip2"
    model_types = frozenset({"blip-2"})
    shared_classes = frozenset({"Blip2ForConditionalGeneration"})

    def shared_generate(
        self,
        settings: dict[str, Any],
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        model = self.model
        features = model.get_image_features(pixel_values, return_dict=True).pooler_output
        if input_ids is None:
            start = [model.config.image_token_index] * model.config.num_query_tokens + [
                model.config.text_config.bos_token_id
            ]
            input_ids = torch.tensor([start], dtype=torch.long, device=features.device).repeat(features.shape[0], 1)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = model.get_input_embeddings()(input_ids)
        image_mask = model.get_placeholder_mask(input_ids, embeds)
        embeds = embeds.masked_scatter(image_mask, features.to(embeds.device, embeds.dtype))
        lm = model.language_model
        if lm.config.is_encoder_decoder:  # T5: its encoder reads the prefix once already; share the cross-attention
            return encoder_decoder_generate(lm, settings, inputs_embeds=embeds, attention_mask=attention_mask)
        prefix = {"inputs_embeds": embeds[:, :-1], "attention_mask": attention_mask[:, :-1]}
        return generate_from_prefix(
            lm, settings, prefix, input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask
        )
