"""Chat-style vision-language models (LLaVA: CLIP vision + Llama, a chat template) through CaptionImages."""

from __future__ import annotations

import apache_beam as beam
import pytest
import torch
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that
from helpers import IMG, canonical, has_counts, run_dofn, same_elements
from PIL import Image

from beamcap import CaptionConfig, CaptionImages
from beamcap.model import DEFAULT_CHAT_PROMPT, load_captioner

FAST = {"max_new_tokens": 5}


@pytest.fixture(scope="module")
def llava_dir(model_dirs):
    return model_dirs("llava")


def test_chat_kind_detected_from_the_processor(llava_dir, blip_dir):
    assert load_captioner(CaptionConfig(llava_dir, device="cpu")).kind == "chat"
    assert load_captioner(CaptionConfig(blip_dir, device="cpu")).kind == "prefix"


def test_caption_is_only_the_new_tokens(llava_dir, image_dir):
    captioner = load_captioner(CaptionConfig(llava_dir, device="cpu"))
    assert captioner.tokenizer.padding_side == "left"
    images = [Image.open(image_dir / "red.jpg").convert("RGB"), Image.open(image_dir / "blue.png").convert("RGB")]
    settings = {"max_new_tokens": 5, "do_sample": False, "num_return_sequences": 1}
    captions = captioner.caption(images, None, settings)
    inputs = captioner.prepare(images, None)
    with torch.inference_mode():
        full = captioner.model.generate(**inputs, **settings)
    new_only = captioner.processor.batch_decode(full[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert [c[0] for c in captions] == [t.strip() for t in new_only]
    rendered = captioner.prompt_text(None)
    assert DEFAULT_CHAT_PROMPT in rendered and "<|assistant|>" in rendered
    for (caption,) in captions:
        assert DEFAULT_CHAT_PROMPT not in caption and "<|user|>" not in caption and "<|assistant|>" not in caption


def test_batched_equals_unbatched(llava_dir, image_dir):
    samples = [
        {"text": f"{IMG}x", "images": [str(image_dir / f"{c}.jpg")], "p": p}
        for c, p in [("red", "What is this?"), ("green", None), ("blue", "Name the colour."), ("yellow", None)]
    ]
    config = dict(caption_num=2, keep_candidate_mode="all", do_sample=False, prompt_key="p", **FAST)
    expected = run_dofn(CaptionConfig(llava_dir, gpu_batch_size=1, **config), samples, batch_size=1)
    with TestPipeline() as p:
        out = p | beam.Create(samples) | CaptionImages(llava_dir, gpu_batch_size=4, **config)
        assert_that(out, same_elements(expected["generated"] + expected["original"]))


@pytest.mark.parametrize("mode, k", [("random_any", 1), ("similar_one_simhash", 1), ("all", 3)])
def test_all_modes_and_dj_format(llava_dir, image_dir, mode, k):
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
        out = p | beam.Create(samples) | CaptionImages(llava_dir, caption_num=3, keep_candidate_mode=mode, **FAST)
        assert_that(out, has_counts(2, 2 * k))
    generated = run_dofn(CaptionConfig(llava_dir, caption_num=3, keep_candidate_mode=mode, **FAST), samples)[
        "generated"
    ]
    assert all(g["text"].startswith(IMG + " ") and g["text"].endswith(" <|__dj__eoc|>") for g in generated)
    assert canonical([g["images"] for g in generated]) == canonical([s["images"] for s in samples for _ in range(k)])
