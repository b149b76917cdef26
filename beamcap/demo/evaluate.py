"""Measure the demo captioner on pictures from the 'eval' generator (never used in training).

    python -m beamcap.demo.evaluate [--model DIR] [--n 600]

Greedy decoding through beamcap's own loading path. Prints, for single-shape
pictures, how often the caption names the right colour and the right shape
(both, and each), and the same for counts 2 and 3 including the count word.
"""

from __future__ import annotations

import argparse
import random

from beamcap.config import CaptionConfig
from beamcap.demo import demo_model_path
from beamcap.demo.shapes import COLOURS, COUNT_WORDS, SHAPES, Scene, draw_scene
from beamcap.model import load_captioner


def judge(scene: Scene, caption: str) -> dict[str, bool]:
    words = caption.lower().split()
    shape_ok = (scene.shape if scene.count == 1 else scene.shape + "s") in words
    colour_ok = scene.colour in words and not any(c in words for c in COLOURS if c != scene.colour)
    count_ok = bool(words) and words[0] == COUNT_WORDS[scene.count]
    return {
        "colour": colour_ok,
        "shape": shape_ok,
        "colour_and_shape": colour_ok and shape_ok,
        "all": colour_ok and shape_ok and count_ok,
    }


def evaluate(model: str, n: int, seed: int = 1234, batch_size: int = 32) -> dict[int, dict[str, float]]:
    rng = random.Random(seed)
    captioner = load_captioner(CaptionConfig(model, do_sample=False, device="cpu"))
    settings = {"max_new_tokens": 8, "do_sample": False, "num_return_sequences": 1}
    scenes = [Scene(rng.choice(list(COLOURS)), rng.choice(SHAPES), count) for count in (1, 2, 3) for _ in range(n)]
    images = [draw_scene(s, rng, "eval") for s in scenes]
    captions = []
    for start in range(0, len(images), batch_size):
        captions += [c[0] for c in captioner.caption(images[start : start + batch_size], None, settings)]
    results: dict[int, dict[str, float]] = {}
    for count in (1, 2, 3):
        judged = [judge(s, c) for s, c in zip(scenes, captions, strict=True) if s.count == count]
        results[count] = {k: sum(j[k] for j in judged) / len(judged) for k in judged[0]}
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the bundled demo model)")
    parser.add_argument("--n", type=int, default=600, help="pictures per count (1, 2, 3)")
    args = parser.parse_args(argv)
    results = evaluate(args.model or demo_model_path(), args.n)
    print(f"{'shapes':>6} {'colour':>7} {'shape':>7} {'colour+shape':>13} {'+count':>7}   (n={args.n} each)")
    for count, r in results.items():
        print(f"{count:>6} {r['colour']:>7.1%} {r['shape']:>7.1%} {r['colour_and_shape']:>13.1%} {r['all']:>7.1%}")


if __name__ == "__main__":
    main()
