"""Today's captioners through CaptionImages: a chat model (LLaVA: CLIP vision + Llama, a chat template)
and a task-prompt model (Florence-2: DaViT vision + BART, task tokens)."""

from __future__ import annotations

import apache_beam as beam
import pytest
import torch
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that
from helpers import IMG, canonical, has_counts, run_dofn, same_elements
from PIL import Image

from beamcap import CaptionConfig, CaptionImages
from beamcap.model import DEFAULT_CHAT_PROMPT, DEFAULT_TASK_PROMPT, load_captioner

FAST = {"max_new_tokens": 5}
FAMILIES = {"llava": "chat", "florence2": "task"}


@pytest.fixture(params=sorted(FAMILIES))
def family(request, model_dirs):
    return request.param, model_dirs(request.param)


def _images(image_dir):
    return [Image.open(image_dir / "red.jpg").convert("RGB"), Image.open(image_dir / "blue.png").convert("RGB")]


def test_kind_detected_from_processor_and_config(family, blip_dir):
    name, folder = family
    assert load_captioner(CaptionConfig(folder, device="cpu")).kind == FAMILIES[name]
    assert load_captioner(CaptionConfig(blip_dir, device="cpu")).kind == "prefix"


def test_caption_is_only_the_generated_text(family, image_dir):
    name, folder = family
    captioner = load_captioner(CaptionConfig(folder, device="cpu"))
    images = _images(image_dir)
    settings = {"max_new_tokens": 5, "do_sample": False, "num_return_sequences": 1}
    captions = captioner.caption(images, None, settings)
    inputs = captioner.prepare(images, None)
    with torch.inference_mode():
        full = captioner.model.generate(**inputs, **settings)
    new = full if captioner.model.config.is_encoder_decoder else full[:, inputs["input_ids"].shape[1] :]
    assert [c[0] for c in captions] == [
        t.strip() for t in captioner.processor.batch_decode(new, skip_special_tokens=True)
    ]
    for (caption,) in captions:
        assert DEFAULT_CHAT_PROMPT not in caption and "<|user|>" not in caption and "<|assistant|>" not in caption


def test_chat_turn_and_left_padding(model_dirs):
    captioner = load_captioner(CaptionConfig(model_dirs("llava"), device="cpu"))
    assert captioner.tokenizer.padding_side == "left"
    rendered = captioner.prompt_text(None)
    assert DEFAULT_CHAT_PROMPT in rendered and rendered.endswith("<|assistant|>")


def test_task_token_default(model_dirs, image_dir):
    captioner = load_captioner(CaptionConfig(model_dirs("florence2"), device="cpu"))
    assert captioner.prompt_text(None) == DEFAULT_TASK_PROMPT
    images = _images(image_dir)
    expected = captioner.processor(images=images, text=[DEFAULT_TASK_PROMPT] * 2, return_tensors="pt")
    assert torch.equal(captioner.prepare(images, None)["input_ids"], expected["input_ids"])
    detailed = captioner.prepare(images, "<DETAILED_CAPTION>")["input_ids"]
    assert not torch.equal(detailed, expected["input_ids"])


def test_batched_equals_unbatched(family, image_dir):
    _, folder = family
    samples = [
        {"text": f"{IMG}x", "images": [str(image_dir / f"{c}.jpg")], "p": p}
        for c, p in [("red", None), ("green", None), ("blue", None), ("yellow", None)]
    ]
    config = dict(caption_num=2, keep_candidate_mode="all", do_sample=False, prompt_key="p", **FAST)
    expected = run_dofn(CaptionConfig(folder, gpu_batch_size=1, **config), samples, batch_size=1)
    with TestPipeline() as p:
        out = p | beam.Create(samples) | CaptionImages(folder, gpu_batch_size=4, **config)
        assert_that(out, same_elements(expected["generated"] + expected["original"]))


def test_mixed_chat_prompts_batched_equals_unbatched(model_dirs, image_dir):
    folder = model_dirs("llava")
    samples = [
        {"text": f"{IMG}x", "images": [str(image_dir / f"{c}.jpg")], "p": p}
        for c, p in [("red", "What is this?"), ("green", None), ("blue", "Name the colour."), ("yellow", None)]
    ]
    config = dict(caption_num=2, keep_candidate_mode="all", do_sample=False, prompt_key="p", **FAST)
    expected = run_dofn(CaptionConfig(folder, gpu_batch_size=1, **config), samples, batch_size=1)
    with TestPipeline() as p:
        out = p | beam.Create(samples) | CaptionImages(folder, gpu_batch_size=4, **config)
        assert_that(out, same_elements(expected["generated"] + expected["original"]))


@pytest.mark.parametrize("mode, k", [("random_any", 1), ("similar_one_simhash", 1), ("all", 3)])
def test_all_modes_and_dj_format(family, image_dir, mode, k):
    _, folder = family
    samples = [
        dict(s, _orig=s["text"])
        for s in [
            {"text": f"{IMG} one", "images": [str(image_dir / "red.jpg")]},
            {
                "text": f"{IMG}{IMG} two <|__dj__eoc|>",
                "images": [str(image_dir / "red.jpg"), str(image_dir / "blue.png")],
            },
        ]
    ]
    with TestPipeline() as p:
        out = p | beam.Create(samples) | CaptionImages(folder, caption_num=3, keep_candidate_mode=mode, **FAST)
        assert_that(out, has_counts(2, 2 * k))
    generated = run_dofn(CaptionConfig(folder, caption_num=3, keep_candidate_mode=mode, **FAST), samples)["generated"]
    assert all(g["text"].startswith(IMG + " ") and g["text"].endswith(" <|__dj__eoc|>") for g in generated)
    assert canonical([g["images"] for g in generated]) == canonical([s["images"] for s in samples for _ in range(k)])
