"""One ``generate`` call for a batch, and the gate in front of the shared image pass.

``generate(num_return_sequences=n)`` repeats every input row ``n`` times
before the model reads it, so work that depends only on the image and the
prompt is done ``n`` times. The families that have a shared image pass
(:mod:`beamcap.families`) do that work once per image instead, with the same
tokens as ``model.generate``. Those passes rely on transformers internals
(cache classes, ``generate`` continuing from a cache, BLIP's ``generate``), so
the pass runs only when every condition holds:

- the user has not turned it off (``shared_image_pass=False``);
- the installed transformers is a version it is tested on
  (:data:`TESTED_TRANSFORMERS`; elsewhere plain ``generate``, with one warning);
- the model's exact class is one its family has tested;
- the call samples one beam per candidate with a dynamic cache, on unpadded rows.

Should the pass still fail, the call is run again by ``model.generate``; if
that works, the model keeps to ``model.generate`` from then on, with a
warning. Out-of-memory errors are raised at once, so the caller halves the
batch.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from beamcap.devices import is_out_of_memory
from beamcap.families import Family

_LOGGER = logging.getLogger(__name__)

TESTED_TRANSFORMERS = ">=5.24.0,<5.25"
"""The transformers versions the shared image pass is tested on (the same range as README.md states)."""

_SHARED_INPUTS = frozenset({"pixel_values", "input_ids", "attention_mask", "decoder_input_ids"})
_OPT_OUT = "_beamcap_plain_generate"  # set on a model whose shared pass failed

_PLAIN_SAMPLING = {  # generation settings under which generate samples one beam with a dynamic cache
    "do_sample": True, "num_beams": 1, "use_cache": True, "cache_implementation": None, "penalty_alpha": None,
    "prompt_lookup_num_tokens": None, "assistant_model": None,
}  # fmt: skip
_UNSET_MEANS = {"num_beams": 1, "use_cache": True}


@functools.cache
def transformers_is_tested() -> bool:
    """Whether the installed transformers is in :data:`TESTED_TRANSFORMERS` (warns once when it is not)."""
    import transformers
    from packaging.specifiers import SpecifierSet

    tested = transformers.__version__ in SpecifierSet(TESTED_TRANSFORMERS)
    if not tested:
        _LOGGER.warning(
            "transformers %s is outside the versions beamcap's shared image pass is tested on (%s): every model "
            "runs its own generate (the same captions, more work per candidate with caption_num > 1).",
            transformers.__version__,
            TESTED_TRANSFORMERS,
        )
    return tested


def _plain_sampling(model: Any, settings: dict[str, Any]) -> bool:
    """Whether ``generate`` will sample one beam per candidate with a dynamic cache: the only mode the shared
    pass hands a cache to. A setting missing from ``settings`` must be plain in every generation config that may
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


def shares_image_pass(family: Family, inputs: dict[str, torch.Tensor], settings: dict[str, Any]) -> bool:
    """Whether :func:`generate` runs each image's work once for all its candidates (the user's switch aside)."""
    return (
        family.has_shared_pass
        and settings.get("num_return_sequences", 1) > 1
        and _plain_sampling(family.model, settings)
        and set(inputs) <= _SHARED_INPUTS
        and bool(inputs.get("attention_mask", torch.ones(1)).all())  # no padding: rows share one prompt
        and not getattr(family.model, _OPT_OUT, False)
        and transformers_is_tested()
    )


def generate(
    family: Family, inputs: dict[str, torch.Tensor], settings: dict[str, Any], shared: bool = True
) -> torch.Tensor:
    """``model.generate(**inputs, **settings)``: the same tokens, with less repeated work where the gate allows
    (``shared=False`` closes it)."""
    model = family.model
    if not (shared and shares_image_pass(family, inputs, settings)):
        return model.generate(**inputs, **settings)
    try:
        return family.shared_generate(settings, **inputs)
    except (TypeError, AttributeError, ValueError, RuntimeError, NotImplementedError) as error:
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
