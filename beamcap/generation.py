"""One ``generate`` call for a batch, with each image's work shared by its candidates where the model allows.

``generate(num_return_sequences=n)`` repeats every input row ``n`` times
before the model reads its prompt, so work that depends only on the image and
the prompt is done ``n`` times:

- models whose text decoder cross-attends to the image (BLIP,
  VisionEncoderDecoder, Florence-2, BLIP-2 with T5): the encoder runs once per
  image, but every decoder layer projects its output into cross-attention keys
  and values once per candidate (about a quarter of the time of a 16-token
  caption with BLIP-base on CPU);
- BLIP-2 with a decoder-only language model (OPT), and LLaVA: the language
  model reads the image tokens and the prompt once per candidate;
- GIT: ``generate`` repeats ``pixel_values`` for every candidate, so its image
  encoder runs ``n`` times per image.

For these, beamcap runs that part once per image: one decoder step for the
cross-attention models, or the prompt minus its last token for the
decoder-only ones, whose cache (repeated for the candidates) ``generate`` then
continues from, as it does from any cache; for GIT, hooks on the image
encoder. The tokens are the same as ``model.generate``'s: no random draw is
added or moved, and the tests compare them token for token. Other model
classes (subclasses included), beam search, one candidate, and padded calls
run ``model.generate`` unchanged.
"""

from __future__ import annotations

import inspect
import logging
import threading
from typing import Any

import torch

_LOGGER = logging.getLogger(__name__)
_SHARED_INPUTS = frozenset({"pixel_values", "input_ids", "attention_mask", "decoder_input_ids"})
_OPT_OUT = "_beamcap_plain_generate"  # set on a model whose shared path failed


def _shared_generate(model: Any):
    """The function that runs ``model``'s generate with each image's work shared, or None."""
    from transformers import (
        Blip2ForConditionalGeneration,
        BlipForConditionalGeneration,
        Florence2ForConditionalGeneration,
        GitForCausalLM,
        LlavaForConditionalGeneration,
        VisionEncoderDecoderModel,
    )

    if type(model) is BlipForConditionalGeneration:
        return _blip_generate
    if type(model) is Blip2ForConditionalGeneration:
        return _blip2_generate
    if type(model) is LlavaForConditionalGeneration:
        return _llava_generate
    if type(model) in (VisionEncoderDecoderModel, Florence2ForConditionalGeneration):
        return _encoder_decoder_generate
    if type(model) is GitForCausalLM:
        return _git_generate
    return None


def shares_image_pass(model: Any, inputs: dict[str, torch.Tensor], settings: dict[str, Any]) -> bool:
    """Whether :func:`generate` runs each image's work once for all its candidates."""
    return (
        _shared_generate(model) is not None
        and settings.get("num_return_sequences", 1) > 1
        and _plain_sampling(model, settings)
        and set(inputs) <= _SHARED_INPUTS
        and bool(inputs.get("attention_mask", torch.ones(1)).all())  # no padding: rows share one prompt
    )


_PLAIN_SAMPLING = {  # generation settings under which generate samples one beam with a dynamic cache
    "do_sample": True, "num_beams": 1, "use_cache": True, "cache_implementation": None, "penalty_alpha": None,
    "prompt_lookup_num_tokens": None, "assistant_model": None,
}  # fmt: skip
_UNSET_MEANS = {"num_beams": 1, "use_cache": True}


def _plain_sampling(model: Any, settings: dict[str, Any]) -> bool:
    """Whether ``generate`` will sample one beam per candidate with a dynamic cache: the only mode the shared
    path hands a cache to. A setting missing from ``settings`` must be plain in every generation config that may
    apply: the model's and that of the text model whose ``generate`` it calls (a checkpoint may set
    ``num_beams=3`` there)."""
    configs = [model.generation_config]
    for name in ("text_decoder", "language_model"):
        config = getattr(getattr(model, name, None), "generation_config", None)
        if config is not None:
            configs.append(config)
    for key, wanted in _PLAIN_SAMPLING.items():
        values = [settings[key]] if key in settings else [getattr(config, key, None) for config in configs]
        if any((_UNSET_MEANS.get(key) if value is None else value) != wanted for value in values):
            return False
    return True


def generate(model: Any, inputs: dict[str, torch.Tensor], settings: dict[str, Any]) -> torch.Tensor:
    """``model.generate(**inputs, **settings)``: the same tokens, with less repeated work where supported.

    Should the shared path fail (say, a transformers version whose internals it does not fit), the call is run
    again by ``model.generate``; if that succeeds, the model keeps to ``model.generate`` from then on, with a
    warning, and if it fails too, its error is raised. Out-of-memory errors are raised at once.
    """
    if shares_image_pass(model, inputs, settings) and not getattr(model, _OPT_OUT, False):
        try:
            return _shared_generate(model)(model, settings, **inputs)
        except (TypeError, AttributeError, ValueError, RuntimeError) as error:
            from beamcap.model import is_out_of_memory

            if is_out_of_memory(error):
                raise  # the caller halves the batch
            sequences = model.generate(**inputs, **settings)  # its own error, if it fails too
            setattr(model, _OPT_OUT, True)
            _LOGGER.warning(
                "beamcap's shared image pass failed on %s (%s: %s), where the model's own generate works; "
                "using the model's own generate from now on (the same captions, more work per candidate).",
                type(model).__name__,
                type(error).__name__,
                error,
            )
            return sequences
    return model.generate(**inputs, **settings)


def _cache_kwarg(module: Any) -> str:
    """The name the module's ``forward`` takes its cache by (``cache`` since transformers 5.2x)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _blip_generate(
    model: Any,
    settings: dict[str, Any],
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``BlipForConditionalGeneration.generate``, with the cross-attention keys and values computed per image."""
    text_config = model.config.text_config
    image_embeds = model.vision_model(pixel_values=pixel_values)[0]
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    if input_ids is None:
        input_ids = torch.tensor([[text_config.bos_token_id, text_config.eos_token_id]], device=image_embeds.device)
        input_ids = input_ids.repeat(image_embeds.shape[0], 1)
    input_ids = input_ids.clone()
    input_ids[:, 0] = text_config.bos_token_id
    input_ids = input_ids[:, :-1]  # BLIP drops the processor's trailing [SEP]
    if attention_mask is not None:
        attention_mask = attention_mask[:, :-1]

    decoder = model.text_decoder
    # One decoder step on the images alone fills every layer's cross-attention cache (its self-attention part is
    # dropped, so generate starts from the prompt as model.generate would).
    _, cache = _cross_attention_cache(
        decoder,
        settings,
        input_ids=input_ids[:, :1],
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_mask,
    )
    return decoder.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        eos_token_id=text_config.sep_token_id,
        pad_token_id=text_config.pad_token_id,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_mask,
        **cache,
        **settings,
    )


def _blip2_generate(
    model: Any,
    settings: dict[str, Any],
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Blip2ForConditionalGeneration.generate`` (decoder-only language model), with the prefix run once per image."""
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
    if lm.config.is_encoder_decoder:  # T5: the encoder reads the prefix once already; share the cross-attention
        return _encoder_decoder_generate(lm, settings, inputs_embeds=embeds, attention_mask=attention_mask)
    prefix = {"inputs_embeds": embeds[:, :-1], "attention_mask": attention_mask[:, :-1]}
    return _generate_from_prefix(
        lm, settings, prefix, input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask
    )


def _llava_generate(
    model: Any,
    settings: dict[str, Any],
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """LLaVA's generate, with the image tokens and the prompt run once per image (the cache holds the image)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    prefix = {"input_ids": input_ids[:, :-1], "attention_mask": attention_mask[:, :-1], "pixel_values": pixel_values}
    return _generate_from_prefix(model, settings, prefix, input_ids=input_ids, attention_mask=attention_mask)


def _generate_from_prefix(
    model: Any, settings: dict[str, Any], prefix: dict[str, torch.Tensor], **whole: torch.Tensor
) -> torch.Tensor:
    """A decoder-only model's generate on the ``whole`` prompt, its ``prefix`` (all of it but the last token, with
    the images) run once per image, not once per candidate.

    The prefix's cache, repeated for the candidates, is handed to ``generate``, which then runs only the last
    prompt token, as when it continues from any cache: its first draw sees the logits it would have computed
    from the whole prompt.
    """
    from transformers.cache_utils import DynamicCache

    name = _cache_kwarg(model)
    cache = DynamicCache(config=model.config.get_text_config())
    model(**prefix, use_cache=True, logits_to_keep=1, **{name: cache})
    cache.batch_repeat_interleave(settings["num_return_sequences"])
    return model.generate(**whole, **{name: cache}, **settings)


def _cross_attention_cache(module: Any, settings: dict[str, Any], **one_step: torch.Tensor) -> tuple[Any, dict]:
    """Run ``module`` for one decoder token per image; return its output, and the keyword argument that hands
    ``generate`` every decoder layer's cross-attention cache from that step, repeated for the candidates (the
    step's self-attention is dropped)."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    config = module.config.get_text_config(decoder=True)
    name = _cache_kwarg(module)
    first = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
    out = module(**one_step, use_cache=True, **{name: first})
    cross = first.cross_attention_cache
    cross.batch_repeat_interleave(settings["num_return_sequences"])  # an image's candidates are adjacent rows
    return out, {name: EncoderDecoderCache(DynamicCache(config=config), cross)}


def _encoder_decoder_generate(
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
    out, cache = _cross_attention_cache(model, settings, **encoder_inputs, decoder_input_ids=first_token)
    kept = {k: v for k, v in encoder_inputs.items() if k in ("input_ids", "attention_mask")}
    if decoder_input_ids is not None:
        kept["decoder_input_ids"] = decoder_input_ids
    return model.generate(
        **kept, encoder_outputs=BaseModelOutput(last_hidden_state=out.encoder_last_hidden_state), **cache, **settings
    )


_GIT_CALL = threading.local()  # .candidates: n while this thread runs _git_generate
_HOOK_LOCK = threading.Lock()


def _git_generate(model: Any, settings: dict[str, Any], **inputs: torch.Tensor) -> torch.Tensor:
    """GIT's generate, with its image encoder run once per image.

    GIT reads ``pixel_values`` inside ``forward``, and ``generate`` has repeated them for every candidate, so
    its vision model would run ``n`` times per image. Hooks on the image encoder (inert outside this call)
    run it on one copy of each image and repeat the features for the candidates.
    """
    encoder = model.git.image_encoder
    with _HOOK_LOCK:
        if not getattr(encoder, "_beamcap_hooked", False):
            encoder.register_forward_pre_hook(_one_copy_per_image, with_kwargs=True)
            encoder.register_forward_hook(_features_per_candidate)
            encoder._beamcap_hooked = True
    _GIT_CALL.candidates = settings["num_return_sequences"]
    try:
        return model.generate(**inputs, **settings)
    finally:
        _GIT_CALL.candidates = None
        _GIT_CALL.deduplicated = False


def _one_copy_per_image(_module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    n = getattr(_GIT_CALL, "candidates", None)
    pixel_values = args[0] if args else kwargs.get("pixel_values")
    _GIT_CALL.deduplicated = False
    if not n or pixel_values is None or pixel_values.shape[0] % n:
        return None
    unique = pixel_values[::n]
    if not torch.equal(unique.repeat_interleave(n, dim=0), pixel_values):
        return None  # not generate's repeated copies: run as given
    _GIT_CALL.deduplicated = True
    if args:
        return (unique, *args[1:]), kwargs
    return args, {**kwargs, "pixel_values": unique}


def _features_per_candidate(_module: Any, _args: tuple, output: Any) -> Any:
    if not getattr(_GIT_CALL, "deduplicated", False):
        return None
    _GIT_CALL.deduplicated = False
    n = _GIT_CALL.candidates
    for key, value in output.items():
        if isinstance(value, torch.Tensor):
            output[key] = value.repeat_interleave(n, dim=0)
    return output
