"""Every tested model family, from one table: detection, captions through the transform, batching, and the shared
image pass (the same tokens as ``model.generate``, with each image's work done once).

Adding a family: its module in beamcap/families/, its builder in beamcap/testing/models.py, and its row here.
"""

from __future__ import annotations

import apache_beam as beam
import pytest
import torch
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that
from helpers import IMG, canonical, has_counts, run_dofn, same_elements
from PIL import Image

from beamcap import CaptionConfig, CaptionImages
from beamcap.families import DEFAULT_CHAT_PROMPT, DEFAULT_TASK_PROMPT, Kind
from beamcap.generation import generate, shares_image_pass
from beamcap.model import load_captioner
from beamcap.sampling import seeded_settings

# builder name -> (family name, kind, a module model.generate runs once per candidate and beamcap once per image)
FAMILIES = {
    "blip": ("blip", Kind.PREFIX, lambda m: m.text_decoder.bert.encoder.layer[0].crossattention.self.key),
    "blip2_opt": ("blip2", Kind.PREFIX, None),  # its prefix: test_the_language_models_prompt_is_run_once_per_image
    "blip2_t5": ("blip2", Kind.PREFIX, lambda m: m.language_model.decoder.block[0].layer[1].EncDecAttention.k),
    "git": ("git", Kind.PREFIX, lambda m: m.git.image_encoder),  # GIT's generate repeats pixel_values
    "vision_encoder_decoder": (
        "vision_encoder_decoder",
        Kind.PREFIX,
        lambda m: m.decoder.transformer.h[0].crossattention.c_attn,
    ),
    "llava": ("chat", Kind.CHAT, None),
    "florence2": ("florence2", Kind.TASK, lambda m: m.model.language_model.decoder.layers[0].encoder_attn.k_proj),
}
NEW_TEXT_ONLY = [name for name, (_, kind, _) in FAMILIES.items() if kind is not Kind.PREFIX]
FAST = {"max_new_tokens": 4}
SETTINGS = {"do_sample": True, "num_return_sequences": 3, "max_new_tokens": 6, "min_new_tokens": 6}


@pytest.fixture(scope="module")
def captioners(model_dirs):
    loaded = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = load_captioner(CaptionConfig(model_dirs(name), device="cpu"))
        return loaded[name]

    return get


def images(n: int) -> list[Image.Image]:
    colours = [(220, 30, 30), (30, 180, 60), (40, 60, 220), (230, 210, 40)]
    return [Image.new("RGB", (40, 30), colours[i % 4]) for i in range(n)]


def both(captioner, inputs: dict, settings: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """beamcap's generate and the model's own, from the same random state."""
    with torch.inference_mode():
        torch.manual_seed(7)
        ours = generate(captioner.family, dict(inputs), settings)
        torch.manual_seed(7)
        theirs = captioner.model.generate(**inputs, **settings)
    return ours, theirs


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_and_kind_are_detected_from_config_and_processor(captioners, name):
    family, kind, _ = FAMILIES[name]
    captioner = captioners(name)
    assert (captioner.family.name, captioner.kind) == (family, kind)
    assert captioner.family.has_shared_pass


MODES = {"random_any": 1, "similar_one_simhash": 1, "all": 2}  # mode: generated samples per captioned sample
# Every family in 'all' (every candidate reaches the output); the other modes, which choose among candidates the
# same way for every family, on one family of each kind.
FAMILY_MODES = [(name, "all") for name in sorted(FAMILIES)] + [
    (name, mode) for name in ("blip", "florence2", "llava") for mode in ("random_any", "similar_one_simhash")
]


@pytest.mark.slow
@pytest.mark.parametrize("name, mode", FAMILY_MODES)
def test_every_family_captions_through_the_transform(model_dirs, image_dir, name, mode):
    k = MODES[mode]
    samples = [
        dict(s, _orig=s["text"])
        for s in [
            {"text": f"{IMG} one", "images": [str(image_dir / "red.jpg")]},
            {
                "text": f"{IMG}{IMG} two <|__dj__eoc|>",
                "images": [str(image_dir / "red.jpg"), str(image_dir / "blue.png")],
            },
            {"text": "no image", "images": []},
        ]
    ]
    config = dict(caption_num=2, keep_candidate_mode=mode, prompt="a photo of", gpu_batch_size=2, **FAST)
    with TestPipeline() as p:
        out = p | beam.Create(samples) | CaptionImages(model_dirs(name), **config)
        assert_that(out, has_counts(3, 2 * k))
    generated = run_dofn(CaptionConfig(model_dirs(name), **config), samples)["generated"]
    assert all(g["text"].startswith(IMG + " ") and g["text"].endswith(" <|__dj__eoc|>") for g in generated)
    assert canonical([g["images"] for g in generated]) == canonical(
        [s["images"] for s in samples[:2] for _ in range(k)]
    )


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_batched_equals_unbatched_with_mixed_prompts(model_dirs, image_dir, name):
    samples = [
        {"text": f"{IMG}x", "images": [str(image_dir / f"{c}.jpg")], "p": p}
        for c, p in [("red", "What is this?"), ("green", None), ("blue", "a photo of"), ("yellow", None)]
    ]
    config = dict(caption_num=2, keep_candidate_mode="all", do_sample=False, prompt_key="p", **FAST)
    expected = run_dofn(CaptionConfig(model_dirs(name), gpu_batch_size=1, **config), samples, batch_size=1)
    with TestPipeline() as p:
        out = p | beam.Create(samples) | CaptionImages(model_dirs(name), gpu_batch_size=4, **config)
        assert_that(out, same_elements(expected["generated"] + expected["original"]))


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("prompt", [None, "a photo of"])
def test_shared_pass_gives_the_same_tokens_as_the_models_generate(captioners, name, prompt):
    captioner = captioners(name)
    inputs = captioner.prepare(images(4), prompt)
    assert shares_image_pass(captioner.family, inputs, SETTINGS)
    ours, theirs = both(captioner, inputs, SETTINGS)
    assert ours.shape[0] == 4 * SETTINGS["num_return_sequences"]
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_shared_pass_gives_the_same_tokens_with_seeded_rows(captioners, name):
    captioner = captioners(name)
    inputs = captioner.prepare(images(3), None)
    rows = list(range(100, 100 + 3 * SETTINGS["num_return_sequences"]))
    ours, theirs = both(captioner, inputs, seeded_settings(captioner.model, SETTINGS, rows))
    assert torch.equal(ours, theirs)
    again, _ = both(captioner, inputs, seeded_settings(captioner.model, SETTINGS, rows))
    assert torch.equal(ours, again)


@pytest.mark.parametrize("name", sorted(n for n, row in FAMILIES.items() if row[2] is not None))
def test_image_work_is_done_once_per_image(captioners, name):
    captioner = captioners(name)
    inputs = captioner.prepare(images(2), None)
    seen: list[int] = []
    module = FAMILIES[name][2](captioner.model)
    handle = module.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    try:
        with torch.inference_mode():
            generate(captioner.family, dict(inputs), SETTINGS)
            ours = list(seen)
            seen.clear()
            captioner.model.generate(**inputs, **SETTINGS)  # GIT's hooks are inert outside beamcap's call
            theirs = list(seen)
    finally:
        handle.remove()
    assert ours == [2]  # once, for the two images
    assert theirs == [2 * SETTINGS["num_return_sequences"]]  # the model's generate: once per candidate


@pytest.mark.parametrize("name, layer", [("blip2_opt", lambda m: m.language_model.model.decoder.layers[0]),
                                         ("llava", lambda m: m.model.language_model.layers[0])])  # fmt: skip
def test_the_language_models_prompt_is_run_once_per_image(captioners, name, layer):
    """Decoder-only language models: the prefix (image tokens and prompt) goes through the language model for
    2 rows, not 2 x 3."""
    captioner = captioners(name)
    inputs = captioner.prepare(images(2), "a photo of")
    width = inputs["input_ids"].shape[1]
    seen: list[tuple[int, int]] = []
    handle = layer(captioner.model).register_forward_hook(lambda _m, args, _out: seen.append(tuple(args[0].shape[:2])))
    try:
        with torch.inference_mode():
            generate(captioner.family, dict(inputs), SETTINGS)
    finally:
        handle.remove()
    n = SETTINGS["num_return_sequences"]
    assert seen[0] == (2, width - 1)  # the prefix, once per image
    assert seen[1:] == [(2 * n, 1)] * SETTINGS["max_new_tokens"]  # then one token per step for every candidate


@pytest.mark.parametrize("name", NEW_TEXT_ONLY)
def test_chat_and_task_captions_are_only_the_generated_text(captioners, name):
    captioner = captioners(name)
    settings = {"max_new_tokens": 5, "do_sample": False, "num_return_sequences": 1}
    captions = captioner.caption(images(2), None, settings)
    inputs = captioner.prepare(images(2), None)
    with torch.inference_mode():
        full = captioner.model.generate(**inputs, **settings)
    new = full if captioner.model.config.is_encoder_decoder else full[:, inputs["input_ids"].shape[1] :]
    assert [c[0] for c in captions] == [
        t.strip() for t in captioner.family.processor.batch_decode(new, skip_special_tokens=True)
    ]
    for (caption,) in captions:
        assert DEFAULT_CHAT_PROMPT not in caption and "<|user|>" not in caption and "<|assistant|>" not in caption


def test_chat_turn_and_left_padding(captioners):
    family = captioners("llava").family
    assert family.tokenizer.padding_side == "left"
    rendered = family.prompt_text(None)
    assert DEFAULT_CHAT_PROMPT in rendered and rendered.endswith("<|assistant|>")


def test_task_token_default(captioners):
    captioner = captioners("florence2")
    assert captioner.family.prompt_text(None) == DEFAULT_TASK_PROMPT
    expected = captioner.family.processor(images=images(2), text=[DEFAULT_TASK_PROMPT] * 2, return_tensors="pt")
    assert torch.equal(captioner.prepare(images(2), None)["input_ids"], expected["input_ids"])
    detailed = captioner.prepare(images(2), "<DETAILED_CAPTION>")["input_ids"]
    assert not torch.equal(detailed, expected["input_ids"])
