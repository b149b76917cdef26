"""Candidates share their image's cross-attention: the same tokens as ``model.generate``, less repeated work."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from beamcap import generation
from beamcap.config import CaptionConfig
from beamcap.generation import generate, shares_image_pass
from beamcap.model import load_captioner
from beamcap.sampling import seeded_settings

SETTINGS = {"do_sample": True, "num_return_sequences": 3, "max_new_tokens": 6, "min_new_tokens": 6}


@pytest.fixture(scope="module")
def blip(blip_dir):
    return load_captioner(CaptionConfig(blip_dir, device="cpu"))


def images(n: int) -> list[Image.Image]:
    colours = [(220, 30, 30), (30, 180, 60), (40, 60, 220), (230, 210, 40)]
    return [Image.new("RGB", (40, 30), colours[i % 4]) for i in range(n)]


def both(captioner, inputs: dict, settings: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """beamcap's generate and the model's own, from the same random state."""
    with torch.inference_mode():
        torch.manual_seed(7)
        ours = generate(captioner.model, dict(inputs), settings)
        torch.manual_seed(7)
        theirs = captioner.model.generate(**inputs, **settings)
    return ours, theirs


@pytest.fixture(scope="module")
def captioners(model_dirs, blip):
    loaded = {"blip": blip}

    def get(family: str):
        if family not in loaded:
            loaded[family] = load_captioner(CaptionConfig(model_dirs(family), device="cpu"))
        return loaded[family]

    return get


SHARED = ["blip", "blip2_opt", "blip2_t5", "florence2", "git", "llava", "vision_encoder_decoder"]


@pytest.mark.parametrize("family", SHARED)
@pytest.mark.parametrize("prompt", [None, "a photo of"])
def test_same_tokens_as_the_models_generate(captioners, family, prompt):
    captioner = captioners(family)
    inputs = captioner.prepare(images(4), prompt)
    assert shares_image_pass(captioner.model, inputs, SETTINGS)
    ours, theirs = both(captioner, inputs, SETTINGS)
    assert ours.shape[0] == 4 * SETTINGS["num_return_sequences"]
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("family", SHARED)
def test_same_tokens_with_seeded_rows(captioners, family):
    captioner = captioners(family)
    inputs = captioner.prepare(images(3), None)
    rows = list(range(100, 100 + 3 * SETTINGS["num_return_sequences"]))
    ours, theirs = both(captioner, inputs, seeded_settings(captioner.model, SETTINGS, rows))
    assert torch.equal(ours, theirs)
    again, _ = both(captioner, inputs, seeded_settings(captioner.model, SETTINGS, rows))
    assert torch.equal(ours, again)


RUN_ONCE_PER_IMAGE = {  # a module that model.generate runs once per candidate, and beamcap once per image
    # the first decoder layer's projection of the image embeddings into cross-attention keys
    "blip": lambda model: model.text_decoder.bert.encoder.layer[0].crossattention.self.key,
    "vision_encoder_decoder": lambda model: model.decoder.transformer.h[0].crossattention.c_attn,
    "florence2": lambda model: model.model.language_model.decoder.layers[0].encoder_attn.k_proj,
    "blip2_t5": lambda model: model.language_model.decoder.block[0].layer[1].EncDecAttention.k,
    # GIT's generate repeats pixel_values per candidate; beamcap's hooks run the encoder on one copy of each
    "git": lambda model: model.git.image_encoder,
}


@pytest.mark.parametrize("family", sorted(RUN_ONCE_PER_IMAGE))
def test_image_work_is_done_once_per_image(captioners, family):
    captioner = captioners(family)
    inputs = captioner.prepare(images(2), None)
    seen: list[int] = []
    module = RUN_ONCE_PER_IMAGE[family](captioner.model)
    handle = module.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    try:
        with torch.inference_mode():
            generate(captioner.model, dict(inputs), SETTINGS)
            ours = list(seen)
            seen.clear()
            captioner.model.generate(**inputs, **SETTINGS)  # GIT's hooks are inert outside beamcap's call
            theirs = list(seen)
    finally:
        handle.remove()
    assert ours == [2]  # once, for the two images
    assert theirs == [2 * SETTINGS["num_return_sequences"]]  # the model's generate: once per candidate


@pytest.mark.parametrize(
    "settings",
    [
        dict(SETTINGS, num_return_sequences=1),
        dict(SETTINGS, num_beams=3, do_sample=False),
        dict(SETTINGS, use_cache=False),
    ],
    ids=["one-candidate", "beam-search", "no-cache"],
)
def test_other_settings_run_the_models_generate(blip, settings):
    inputs = blip.prepare(images(2), None)
    assert not shares_image_pass(blip.model, inputs, settings)
    ours, theirs = both(blip, inputs, settings)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    "settings",
    [
        dict(SETTINGS, cache_implementation="static"),
        dict(SETTINGS, penalty_alpha=0.6, top_k=4),
        dict(SETTINGS, prompt_lookup_num_tokens=3),
        {k: v for k, v in SETTINGS.items() if k != "do_sample"},
    ],
    ids=["static-cache", "contrastive", "prompt-lookup", "sampling-unset"],
)
def test_other_decoding_modes_are_left_to_the_models_generate(blip, settings):
    assert not shares_image_pass(blip.model, blip.prepare(images(2), None), settings)


def test_beams_set_by_the_checkpoints_generation_config_run_the_models_generate(blip):
    """A checkpoint whose text decoder's generation config asks for beams gets them, as with model.generate."""
    config = blip.model.text_decoder.generation_config
    config.num_beams = 3
    try:
        inputs = blip.prepare(images(2), None)
        assert not shares_image_pass(blip.model, inputs, SETTINGS)
        ours, theirs = both(blip, inputs, SETTINGS)
        assert torch.equal(ours, theirs)
    finally:
        config.num_beams = 1


def test_a_subclass_runs_its_own_generate(blip_dir):
    """A model class beamcap has not checked (say, remote code subclassing BLIP) keeps its own generate."""
    from transformers import BlipForConditionalGeneration

    captioner = load_captioner(CaptionConfig(blip_dir, device="cpu"))
    captioner.model.__class__ = type("RemoteBlip", (BlipForConditionalGeneration,), {})
    inputs = captioner.prepare(images(2), None)
    assert not shares_image_pass(captioner.model, inputs, SETTINGS)
    ours, theirs = both(captioner, inputs, SETTINGS)
    assert torch.equal(ours, theirs)


def test_the_language_models_prompt_is_run_once_per_image(captioners):
    """BLIP-2 (OPT): the prefix (query tokens and prompt) goes through the language model for 2 rows, not 2 x 3."""
    captioner = captioners("blip2_opt")
    inputs = captioner.prepare(images(2), "a photo of")
    width = inputs["input_ids"].shape[1]
    seen: list[tuple[int, int]] = []
    layer = captioner.model.language_model.model.decoder.layers[0]
    handle = layer.register_forward_hook(lambda _m, args, _out: seen.append(tuple(args[0].shape[:2])))
    try:
        with torch.inference_mode():
            generate(captioner.model, dict(inputs), SETTINGS)
    finally:
        handle.remove()
    n = SETTINGS["num_return_sequences"]
    assert seen[0] == (2, width - 1)  # the prefix, once per image
    assert seen[1:] == [(2 * n, 1)] * SETTINGS["max_new_tokens"]  # then one token per step for every candidate


def test_a_failing_shared_path_falls_back_to_the_models_generate(captioners, monkeypatch, caplog):
    captioner = captioners("blip2_opt")
    model = captioner.model
    inputs = captioner.prepare(images(2), None)

    def renamed(*args, **kwargs):
        raise TypeError("get_image_features() got an unexpected keyword argument 'return_dict'")

    monkeypatch.setattr(model, "get_image_features", renamed)
    try:
        ours, theirs = both(captioner, inputs, SETTINGS)
        assert torch.equal(ours, theirs)
        assert "shared image pass failed on Blip2ForConditionalGeneration" in caplog.text
        assert getattr(model, generation._OPT_OUT)
    finally:
        model.__dict__.pop(generation._OPT_OUT, None)  # the model is shared by this module's tests


def test_out_of_memory_in_the_shared_path_is_raised_for_the_caller_to_halve(captioners, monkeypatch):
    captioner = captioners("blip2_opt")
    model = captioner.model

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model, "get_image_features", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError), torch.inference_mode():
        generate(model, dict(captioner.prepare(images(2), None)), SETTINGS)
    assert not getattr(model, generation._OPT_OUT, False)  # the shared path stays on
