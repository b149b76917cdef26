"""GIT (``GitForCausalLM``): a decoder-only captioner that reads the image inside every forward pass."""

from __future__ import annotations

import threading
from typing import Any

import torch

from beamcap.families.base import Family

_CALL = threading.local()  # .candidates: n while this thread runs a shared GIT generate; .deduplicated: per step
_HOOK_LOCK = threading.Lock()


class Git(Family):
    """GIT: the prompt is a text prefix, and the caption starts with it.

    Shared pass: GIT's ``generate`` repeats ``pixel_values`` for every candidate, so its image encoder would run
    ``n`` times per image. Hooks on the image encoder, registered once per model and inert outside beamcap's call
    (a thread-local switch), run it on one copy of each image and repeat the features for the candidates.
    """

    name = "git"
    model_types = frozenset({"git"})
    shared_classes = frozenset({"GitForCausalLM"})

    def shared_generate(self, settings: dict[str, Any], **inputs: torch.Tensor) -> torch.Tensor:
        encoder = self.model.git.image_encoder
        with _HOOK_LOCK:
            if not getattr(encoder, "_beamcap_hooked", False):
                encoder.register_forward_pre_hook(_one_copy_per_image, with_kwargs=True)
                encoder.register_forward_hook(_features_per_candidate)
                encoder._beamcap_hooked = True
        _CALL.candidates = settings["num_return_sequences"]
        try:
            return self.model.generate(**inputs, **settings)
        finally:
            _CALL.candidates = None
            _CALL.deduplicated = False


def _one_copy_per_image(_module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    n = getattr(_CALL, "candidates", None)
    pixel_values = args[0] if args else kwargs.get("pixel_values")
    _CALL.deduplicated = False
    if not n or pixel_values is None or pixel_values.shape[0] % n:
        return None
    unique = pixel_values[::n]
    if not torch.equal(unique.repeat_interleave(n, dim=0), pixel_values):
        return None  # not generate's repeated copies: run as given
    _CALL.deduplicated = True
    if args:
        return (unique, *args[1:]), kwargs
    return args, {**kwargs, "pixel_values": unique}


def _features_per_candidate(_module: Any, _args: tuple, output: Any) -> Any:
    # The post-hook cannot see the input the pre-hook replaced, so the pre-hook leaves a flag for it.
    if not getattr(_CALL, "deduplicated", False):
        return None
    _CALL.deduplicated = False
    n = _CALL.candidates
    for key, value in output.items():
        if isinstance(value, torch.Tensor):
            output[key] = value.repeat_interleave(n, dim=0)
    return output
