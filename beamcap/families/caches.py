"""Cache helpers that several families' shared image passes use (below the families: they import none of them).

``generate(num_return_sequences=n)`` repeats every input row ``n`` times before
the model reads it. These helpers run what depends only on the image and the
prompt once per image and hand ``generate`` the result as a cache, repeated
for the candidates, which ``generate`` continues from as from any cache.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


def cache_kwarg(module: Any) -> str:
    """The name the module's ``forward`` takes its cache by (``cache`` since transformers 5.2x)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def cross_attention_cache(module: Any, settings: dict[str, Any], **one_step: torch.Tensor) -> tuple[Any, dict]:
    """Run ``module`` for one decoder token per image; return its output, and the keyword argument that hands
    ``generate`` every decoder layer's cross-attention cache from that step, repeated for the candidates (the
    step's self-attention is dropped)."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    config = module.config.get_text_config(decoder=True)
    name = cache_kwarg(module)
    first = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
    out = module(**one_step, use_cache=True, **{name: first})
    cross = first.cross_attention_cache
    cross.batch_repeat_interleave(settings["num_return_sequences"])  # an image's candidates are adjacent rows
    return out, {name: EncoderDecoderCache(DynamicCache(config=config), cross)}


def encoder_decoder_generate(
    model: Any, settings: dict[str, Any], decoder_input_ids: torch.Tensor | None = None, **encoder_inputs: torch.Tensor
) -> torch.Tensor:
    """An encoder-decoder's generate, with the cross-attention keys and values computed once per image.

    One forward pass with a single decoder token runs the encoder and fills every decoder layer's
    cross-attention cache; ``generate`` is then handed the encoder's output (so it does not run the encoder
    again) and that cache, repeated for the candidates. The decoder token's self-attention is dropped.
    """
    from transformers.modeling_outputs import BaseModelOutput

    if decoder_input_ids is None:  # the token only fills the cache, so any valid id does; use the start token
        start = model.generation_config.decoder_start_token_id
        start = model.config.get_text_config(decoder=True).decoder_start_token_id if start is None else start
        some_input = next(iter(encoder_inputs.values()))
        first_token = torch.full((some_input.shape[0], 1), start or 0, dtype=torch.long, device=some_input.device)
    else:
        first_token = decoder_input_ids[:, :1]
    out, cache = cross_attention_cache(model, settings, **encoder_inputs, decoder_input_ids=first_token)
    kept = {k: v for k, v in encoder_inputs.items() if k in ("input_ids", "attention_mask")}
    if decoder_input_ids is not None:
        kept["decoder_input_ids"] = decoder_input_ids
    return model.generate(
        **kept, encoder_outputs=BaseModelOutput(last_hidden_state=out.encoder_last_hidden_state), **cache, **settings
    )


def generate_from_prefix(
    model: Any, settings: dict[str, Any], prefix: dict[str, torch.Tensor], **whole: torch.Tensor
) -> torch.Tensor:
    """A decoder-only model's generate on the ``whole`` prompt, its ``prefix`` (all of it but the last token, with
    the images) run once per image, not once per candidate.

    The prefix's cache, repeated for the candidates, is handed to ``generate``, which then runs only the last
    prompt token, as when it continues from any cache: its first draw sees the logits it would have computed
    from the whole prompt.
    """
    from transformers.cache_utils import DynamicCache

    name = cache_kwarg(model)
    cache = DynamicCache(config=model.config.get_text_config())
    model(**prefix, use_cache=True, logits_to_keep=1, **{name: cache})
    cache.batch_repeat_interleave(settings["num_return_sequences"])
    return model.generate(**whole, **{name: cache}, **settings)
