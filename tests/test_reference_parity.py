"""beamcap's text format equals the reference operator's wherever docs/behaviour.md does not say it differs.

The oracle below re-states the reference's documented algorithm: per non-empty chunk, keep only the special
tokens, insert " caption " after the next image placeholder for each image of the chunk, append the eoc token.
It differs from beamcap only for chunks with two or more images (the reference inserts every caption after the
first token, in reverse order; docs/behaviour.md, "Differs"), so the property is checked on chunks with at
most one image, and the deliberate difference is checked explicitly.
"""

from __future__ import annotations

import random
import re

import pytest

from beamcap.dj_format import SpecialTokens, plan_text, render_text

IMG, AUD, VID, EOC = "<__dj__image>", "<__dj__audio>", "<__dj__video>", "<|__dj__eoc|>"


def reference_render(text: str, captions: list[str]) -> str:
    special = [IMG, AUD, VID, EOC]
    pattern = "|".join(re.escape(t) for t in special)
    out, offset = "", 0
    for chunk in text.split(EOC):
        if not chunk.strip():
            continue
        n = chunk.count(IMG)
        only_special = "".join(re.findall(pattern, chunk))
        for caption in captions[offset : offset + n]:
            index = only_special.find(IMG)  # the reference searches from the start each time
            only_special = only_special[: index + len(IMG)] + f" {caption} " + only_special[index + len(IMG) :]
        out += only_special + EOC
        offset += n
    return out


def random_text(rng: random.Random, max_images_per_chunk: int) -> str:
    words = ["a", "cat", "photo", " ", "\n", "\t", "of", "the"]
    chunks = []
    for _ in range(rng.randint(1, 4)):
        parts = [rng.choice(words) for _ in range(rng.randint(0, 5))]
        for _ in range(rng.randint(0, max_images_per_chunk)):
            parts.insert(rng.randint(0, len(parts)), IMG)
        if rng.random() < 0.3:
            parts.insert(rng.randint(0, len(parts)), rng.choice([AUD, VID]))
        chunks.append("".join(parts))
    return EOC.join(chunks) + (EOC if rng.random() < 0.5 else "")


@pytest.mark.parametrize("seed", range(300))
def test_same_output_as_the_reference_for_chunks_with_at_most_one_image(seed):
    rng = random.Random(seed)
    text = random_text(rng, max_images_per_chunk=1)
    plan = plan_text(text)
    captions = [f"caption {i}" for i in range(plan.num_image_tokens)]
    assert render_text(plan, dict(enumerate(captions)), SpecialTokens()) == reference_render(text, captions)


def test_multi_image_chunks_are_the_deliberate_difference():
    text = f"{IMG}{IMG} two cats{EOC}"
    assert reference_render(text, ["A", "B"]) == f"{IMG} B  A {IMG}{EOC}"  # the reference's order
    assert render_text(plan_text(text), {0: "A", 1: "B"}) == f"{IMG} A {IMG} B {EOC}"  # beamcap: each after its own
