import inspect
import logging

import numpy as np
import pytest

from beamcap import CaptionConfig, CaptionImages, KeepMode

REFERENCE_PARAMS = [
    ("hf_img2seq", "Salesforce/blip2-opt-2.7b"),
    ("trust_remote_code", False),
    ("caption_num", 1),
    ("keep_candidate_mode", "random_any"),
    ("keep_original_sample", True),
    ("prompt", None),
    ("prompt_key", None),
    ("gpu_batch_size", 8),
]


def test_reference_parameters_keep_names_order_and_defaults():
    params = list(inspect.signature(CaptionImages.__init__).parameters.values())[1:9]
    assert [(p.name, p.default) for p in params] == REFERENCE_PARAMS
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)


def test_building_the_transform_loads_nothing():
    # A hub id that cannot be reached here: building must not touch it.
    transform = CaptionImages("no-such-org/no-such-model")
    assert transform.config.keep_candidate_mode is KeepMode.RANDOM_ANY


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"keep_candidate_mode": "best"},
            "keep_candidate_mode must be one of ['random_any', 'similar_one_simhash', 'all']",
        ),
        ({"caption_num": 0}, "caption_num must be a positive int"),
        ({"caption_num": 2.5}, "caption_num must be a positive int"),
        ({"caption_num": True}, "caption_num must be a positive int"),
        ({"gpu_batch_size": 0}, "gpu_batch_size must be a positive int"),
        ({"gpu_batch_size": "8"}, "gpu_batch_size must be a positive int"),
        ({"hf_img2seq": 3}, "hf_img2seq must be"),
        ({"hf_img2seq": ""}, "hf_img2seq must not be empty"),
        ({"trust_remote_code": "yes"}, "trust_remote_code must be a bool"),
        ({"keep_original_sample": 1}, "keep_original_sample must be a bool"),
        ({"prompt": 5}, "prompt must be a str, got int 5"),
        ({"prompt_key": ["p"]}, "prompt_key must be"),
        ({"text_key": ""}, "text_key must be a non-empty str"),
        ({"device": "gpu"}, "device must be"),
        ({"torch_dtype": "float64"}, "torch_dtype must be"),
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive int"),
        ({"seed": "1"}, "seed must be an int, got str '1'"),
        ({"min_batch_size": 9}, "min_batch_size (9) must be <="),
        ({"min_batch_size": 4, "max_batch_size": 2}, "max_batch_size (2) must be >= min_batch_size (4)"),
        ({"num_return_sequences": 3}, "cannot be passed"),
        ({"large_model": 1}, "large_model must be a bool"),
        ({"model_copies": 0}, "model_copies must be a positive int"),
        ({"max_batch_duration_secs": 0}, "max_batch_duration_secs must be a number of seconds > 0"),
        ({"max_batch_duration_secs": "5"}, "max_batch_duration_secs must be a number of seconds > 0"),
        ({"max_batch_duration_secs": float("nan")}, "max_batch_duration_secs must be a number of seconds > 0"),
        ({"streaming_shards": 0}, "streaming_shards must be a positive int"),
        ({"prefetch_images": True}, "prefetch_images was removed"),
        ({"shared_image_pass": "yes"}, "shared_image_pass must be a bool"),
        ({"hf_img2seq": None}, "hf_img2seq must not be None"),
        ({"do_sample": False, "caption_num": 3, "num_beams": 2}, "needs num_beams >= caption_num"),
        # common generate arguments are checked here, not at every batch's first generate call
        ({"num_beams": 0}, "generate_kwargs num_beams must be a positive int, got 0"),
        ({"do_sample": True, "top_k": 5.0}, "generate_kwargs top_k must be an int >= 0, got 5.0"),
        ({"do_sample": True, "top_p": "0.9"}, "generate_kwargs top_p must be a number in [0, 1], got '0.9'"),
        ({"do_sample": True, "top_p": 1.5}, "generate_kwargs top_p must be a number in [0, 1], got 1.5"),
        ({"do_sample": True, "temperature": 0}, "generate_kwargs temperature must be a finite number > 0, got 0"),
        ({"temperature": float("nan")}, "generate_kwargs temperature must be a finite number > 0, got nan"),
        ({"repetition_penalty": True}, "generate_kwargs repetition_penalty must be a finite number > 0, got True"),
        ({"no_repeat_ngram_size": -1}, "generate_kwargs no_repeat_ngram_size must be an int >= 0, got -1"),
        ({"length_penalty": float("inf")}, "generate_kwargs length_penalty must be a finite number, got inf"),
    ],
)
def test_invalid_configuration_raises_naming_the_parameter(kwargs, message):
    with pytest.raises(ValueError) as e:
        CaptionImages(**kwargs)
    assert message in str(e.value)


def test_valid_generate_arguments_pass_with_the_types_transformers_wants():
    """Whole and numpy numbers are taken for the float arguments and passed as floats (transformers' temperature
    and repetition_penalty processors refuse an int); the sampling-only ones are not checked without sampling
    (transformers ignores them then, with a warning); arguments beamcap does not know pass as given."""
    given = {"top_k": np.int64(0), "top_p": 1, "temperature": 2, "repetition_penalty": np.float32(1.5)}
    settings = CaptionConfig(do_sample=True, generate_kwargs={**given, "length_penalty": -1, "typical_p": 0.9})
    settings = settings.generation_settings()
    expected = {"top_k": 0, "top_p": 1.0, "temperature": 2.0, "repetition_penalty": 1.5, "length_penalty": -1.0}
    assert {k: (settings[k], type(settings[k])) for k in expected} == {k: (v, type(v)) for k, v in expected.items()}
    assert settings["typical_p"] == 0.9
    greedy = CaptionConfig(do_sample=False, generate_kwargs={"temperature": 0, "top_p": 2}).generation_settings()
    assert greedy["temperature"] == 0 and greedy["top_p"] == 2


def test_mode_accepts_enum_and_string():
    assert CaptionConfig(keep_candidate_mode=KeepMode.ALL).keep_candidate_mode is KeepMode.ALL
    assert CaptionConfig(keep_candidate_mode="all").keep_candidate_mode is KeepMode.ALL


def test_generation_settings():
    assert CaptionConfig().generation_settings() == {
        "max_new_tokens": 128,
        "do_sample": True,
        "num_return_sequences": 1,
    }
    greedy = CaptionConfig(caption_num=3, do_sample=False).generation_settings()
    assert greedy["num_beams"] == 3 and greedy["num_return_sequences"] == 3
    extra = CaptionConfig(caption_num=2, generate_kwargs={"top_p": 0.9}).generation_settings()
    assert extra["top_p"] == 0.9 and "num_beams" not in extra


def test_dtype_accepts_torch_dtype():
    import torch

    assert CaptionConfig(torch_dtype=torch.bfloat16).torch_dtype == "bfloat16"


def test_prompt_precedence():
    config = CaptionConfig(prompt="global", prompt_key="p")
    assert config.prompt_for({"p": "mine"}) == "mine"
    assert config.prompt_for({}) == "global"
    assert config.prompt_for({"p": 3}) == "global"
    assert CaptionConfig(prompt_key="p").prompt_for({"p": None}) is None
    assert CaptionConfig(prompt="").prompt_for({}) is None


def test_warning_when_both_prompts_set(caplog):
    with caplog.at_level(logging.WARNING, logger="beamcap.config"):
        CaptionConfig(prompt="a", prompt_key="b")
    assert "Both prompt and prompt_key are set" in caplog.text


def test_pathlib_paths_are_accepted(tmp_path):
    config = CaptionConfig(tmp_path / "model", image_root=tmp_path, image_base_dir=tmp_path / "imgs")
    assert (config.hf_img2seq, config.image_root, config.image_base_dir) == (
        str(tmp_path / "model"), str(tmp_path), str(tmp_path / "imgs"),
    )  # fmt: skip


def test_the_transform_signature_equals_the_config():
    """Names, order and defaults: the reference's 8 first and positional, every other field keyword-only, and
    **generate_kwargs last."""
    import dataclasses

    fields = dataclasses.fields(CaptionConfig)
    params = list(inspect.signature(CaptionImages.__init__).parameters.values())[1:]
    assert [p.name for p in params] == [f.name for f in fields]
    for param, spec in zip(params[:-1], fields[:-1], strict=True):
        assert param.default == spec.default, param.name
    assert {p.kind for p in params[:8]} == {inspect.Parameter.POSITIONAL_OR_KEYWORD}
    assert {p.kind for p in params[8:-1]} == {inspect.Parameter.KEYWORD_ONLY}
    assert params[-1].kind is inspect.Parameter.VAR_KEYWORD
    assert CaptionImages(caption_num=2, top_p=0.5).config == CaptionConfig(
        caption_num=2, generate_kwargs={"top_p": 0.5}
    )


def test_every_parameter_is_a_job_flag_with_the_same_default_and_its_help():
    import argparse

    from beamcap.config import parameters
    from pipelines.options import add_caption_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_caption_arguments(parser)
    assert config_from_args(parser.parse_args([])) == CaptionConfig()
    shown = " ".join(parser.format_help().split())
    for p in parameters():
        assert f"--{p.name}" in shown and p.help[:40] in shown


def test_the_readme_table_is_the_declarations():
    import os

    from beamcap.config import markdown_table

    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md"), encoding="utf-8").read()
    assert markdown_table() in readme, "README.md's parameter table drifted: run python -m beamcap.readme README.md"


def test_the_transform_docstring_lists_every_parameter():
    from beamcap.config import parameters

    for p in parameters():
        assert f"{p.name}: {p.help[:40]}" in CaptionImages.__doc__
