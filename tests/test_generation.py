"""The gate in front of the shared image pass: which calls take it, and what happens when it cannot run."""

from __future__ import annotations

import logging

import pytest
import torch
from test_families import SETTINGS, both, images

from beamcap import generation
from beamcap.config import CaptionConfig
from beamcap.generation import generate, shares_image_pass
from beamcap.model import load_captioner


@pytest.fixture(scope="module")
def blip(blip_dir):
    return load_captioner(CaptionConfig(blip_dir, device="cpu"))


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
    assert not shares_image_pass(blip.family, inputs, settings)
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
    assert not shares_image_pass(blip.family, blip.prepare(images(2), None), settings)


def test_beams_set_by_the_checkpoints_generation_config_run_the_models_generate(blip):
    """A checkpoint whose text decoder's generation config asks for beams gets them, as with model.generate."""
    config = blip.model.text_decoder.generation_config
    config.num_beams = 3
    try:
        inputs = blip.prepare(images(2), None)
        assert not shares_image_pass(blip.family, inputs, SETTINGS)
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
    assert not shares_image_pass(captioner.family, inputs, SETTINGS)
    ours, theirs = both(captioner, inputs, SETTINGS)
    assert torch.equal(ours, theirs)


def test_the_user_switch_turns_the_shared_pass_off(blip_dir, monkeypatch):
    captioner = load_captioner(CaptionConfig(blip_dir, device="cpu", shared_image_pass=False))
    called = []
    monkeypatch.setattr(captioner.family, "shared_generate", lambda *a, **k: called.append(1))
    captioner.caption(images(2), None, dict(SETTINGS))
    assert not called


def test_an_untested_transformers_version_runs_the_models_generate_with_one_warning(blip, monkeypatch, caplog):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.99.0")
    generation.transformers_is_tested.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="beamcap.generation"):
            inputs = blip.prepare(images(2), None)
            assert not shares_image_pass(blip.family, inputs, SETTINGS)
            assert not shares_image_pass(blip.family, inputs, SETTINGS)
        assert caplog.text.count("outside the versions beamcap's shared image pass is tested on") == 1
    finally:
        generation.transformers_is_tested.cache_clear()


def test_the_tested_range_matches_the_pinned_transformers():
    """requirements.txt pins a transformers inside TESTED_TRANSFORMERS, and README.md states the range."""
    import os
    import re

    from packaging.specifiers import SpecifierSet

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pinned = re.search(r"^transformers==(\S+)$", open(os.path.join(root, "requirements.txt")).read(), re.M)[1]
    assert pinned in SpecifierSet(generation.TESTED_TRANSFORMERS)
    assert generation.TESTED_TRANSFORMERS in open(os.path.join(root, "README.md"), encoding="utf-8").read()


def test_a_failing_shared_pass_falls_back_to_the_models_generate(model_dirs, monkeypatch, caplog):
    captioner = load_captioner(CaptionConfig(model_dirs("blip2_opt"), device="cpu"))
    model = captioner.model
    inputs = captioner.prepare(images(2), None)

    def renamed(*args, **kwargs):
        raise TypeError("get_image_features() got an unexpected keyword argument 'return_dict'")

    monkeypatch.setattr(model, "get_image_features", renamed)
    ours, theirs = both(captioner, inputs, SETTINGS)
    assert torch.equal(ours, theirs)
    assert "shared image pass failed on Blip2ForConditionalGeneration" in caplog.text
    assert not shares_image_pass(captioner.family, inputs, SETTINGS)  # from now on, the model's own generate


def test_out_of_memory_in_the_shared_pass_is_raised_for_the_caller_to_halve(model_dirs, monkeypatch):
    captioner = load_captioner(CaptionConfig(model_dirs("blip2_opt"), device="cpu"))
    model = captioner.model

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model, "get_image_features", out_of_memory)
    inputs = captioner.prepare(images(2), None)
    with pytest.raises(torch.OutOfMemoryError), torch.inference_mode():
        generate(captioner.family, dict(inputs), SETTINGS)
    assert shares_image_pass(captioner.family, inputs, SETTINGS)  # the shared pass stays on
