"""Measure the demo captioner on pictures from the held-out generator (never used in training).

    python -m beamcap.demo.evaluate [--model DIR] [--n 600] [--style heldout] [--dtype bfloat16]

Pictures come from ``draw_scene(..., style='heldout')`` by default (see
``beamcap/demo/shapes.py``: other canvas sizes, backgrounds, outlines,
rotations and JPEG qualities than the training generator's); ``--style eval``
measures on the first release's evaluation style instead. Greedy decoding
through beamcap's own loading path. Prints, for each count (1, 2, 3), how often
the caption names the right colour, the right shape (plural for 2 and 3), both,
and all three with the count word.
"""

from __future__ import annotations

import argparse
import random
import re

from beamcap.config import CaptionConfig
from beamcap.demo import demo_model_path
from beamcap.demo.shapes import COLOURS, COUNT_WORDS, PROMPTS, SHAPES, STYLES, Scene, draw_scene
from beamcap.model import load_captioner

SETTINGS = {"max_new_tokens": 8, "do_sample": False, "num_return_sequences": 1}


def judge(scene: Scene, caption: str) -> dict[str, bool]:
    """Which parts of ``scene`` the caption names; a caption that begins with one of the training prompts
    ('a photo of two red circles') is judged on what follows it; punctuation is ignored."""
    words = re.findall(r"[a-z]+", caption.lower())
    for prompt in PROMPTS:
        head = prompt.split()
        if words[: len(head)] == head:
            words = words[len(head) :]
            break
    shape_ok = (scene.shape if scene.count == 1 else scene.shape + "s") in words
    colour_ok = scene.colour in words and not any(c in words for c in COLOURS if c != scene.colour)
    count_ok = bool(words) and words[0] == COUNT_WORDS[scene.count]
    return {
        "colour": colour_ok,
        "shape": shape_ok,
        "colour_and_shape": colour_ok and shape_ok,
        "all": colour_ok and shape_ok and count_ok,
    }


def make_pictures(n: int, seed: int = 1234, style: str = "heldout"):
    """``n`` scenes per count (1, 2, 3), random colour and shape, and their pictures in ``style``."""
    rng = random.Random(seed)
    scenes = [Scene(rng.choice(list(COLOURS)), rng.choice(SHAPES), count) for count in (1, 2, 3) for _ in range(n)]
    return scenes, [draw_scene(s, rng, style) for s in scenes]


def caption_all(model: str, images, torch_dtype: str | None = None, batch_size: int = 32) -> list[str]:
    """Greedy captions (at most 8 tokens) for ``images``, through beamcap's loading path."""
    captioner = load_captioner(CaptionConfig(model, do_sample=False, device="cpu", torch_dtype=torch_dtype))
    captions = []
    for start in range(0, len(images), batch_size):
        captions += [c[0] for c in captioner.caption(images[start : start + batch_size], None, SETTINGS)]
    return captions


def score(scenes, captions) -> dict[int, dict[str, float]]:
    results: dict[int, dict[str, float]] = {}
    for count in sorted({s.count for s in scenes}):
        judged = [judge(s, c) for s, c in zip(scenes, captions, strict=True) if s.count == count]
        results[count] = {k: sum(j[k] for j in judged) / len(judged) for k in judged[0]}
    return results


def evaluate(
    model: str,
    n: int,
    seed: int = 1234,
    batch_size: int = 32,
    style: str = "heldout",
    torch_dtype: str | None = None,
) -> dict[int, dict[str, float]]:
    scenes, images = make_pictures(n, seed, style)
    return score(scenes, caption_all(model, images, torch_dtype, batch_size))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the bundled demo model)")
    parser.add_argument("--n", type=int, default=600, help="pictures per count (1, 2, 3)")
    parser.add_argument("--style", default="heldout", choices=STYLES)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--dtype",
        default=None,
        help="torch_dtype to load the model in (default: beamcap's CPU default, float32 without AMX-BF16)",
    )
    args = parser.parse_args(argv)
    results = evaluate(args.model or demo_model_path(), args.n, args.seed, style=args.style, torch_dtype=args.dtype)
    print(
        f"{'shapes':>6} {'colour':>7} {'shape':>7} {'colour+shape':>13} {'+count':>7}   (n={args.n} each, {args.style})"
    )
    for count, r in results.items():
        print(f"{count:>6} {r['colour']:>7.1%} {r['shape']:>7.1%} {r['colour_and_shape']:>13.1%} {r['all']:>7.1%}")


if __name__ == "__main__":
    main()
