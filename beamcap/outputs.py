"""The last stage: what a captioned sample becomes (generated samples), and what a failed one becomes."""

from __future__ import annotations

import copy
from typing import Any

from beamcap.config import CaptionConfig
from beamcap.dj_format import render_text
from beamcap.retention import KeepMode, choose_captions, sample_rng
from beamcap.samples import Work


def failure_record(sample: Any, reason: str) -> dict[str, Any]:
    """What the failed output holds for one sample."""
    return {"sample": sample, "error": reason}


def generated_texts(work: Work, config: CaptionConfig) -> list[str]:
    """The texts of the K generated samples of a captioned ``work``: candidates chosen per the keep mode, each
    caption written after its own image token."""
    plan = work.plan
    order = plan.image_indices
    reference_texts = [chunk.plain_text for chunk in plan.chunks for _ in chunk.image_indices]
    rng = None
    if config.keep_candidate_mode is KeepMode.RANDOM_ANY:
        rng = sample_rng(config.seed, work.key if config.seed is not None else "")
    chosen = choose_captions(config.keep_candidate_mode, [work.candidates[i] for i in order], reference_texts, rng)
    return [render_text(plan, dict(zip(order, captions, strict=True)), config.special_tokens) for captions in chosen]


def generated_samples(work: Work, config: CaptionConfig) -> list[dict[str, Any]]:
    """The generated samples of a captioned ``work``: copies of the input with only the text replaced."""
    samples = []
    for text in generated_texts(work, config):
        generated = copy.deepcopy(work.sample)
        generated[config.text_key] = text
        samples.append(generated)
    return samples
