"""Write the bundled demo dataset: a few shape pictures and a Data-Juicer JSONL file.

    python -m beamcap.demo.make_data --out beamcap/demo/data

Pictures come from the 'eval' drawing style of ``shapes.py`` (the first
release's evaluation style, kept unchanged so that this script redraws the same
pictures; the demo model is trained on the 'train' style and measured on the
'heldout' one). ``truth.json`` maps each picture to its true caption.
"""

from __future__ import annotations

import argparse
import json
import os
import random

from beamcap.demo.shapes import Scene, draw_scene

IMG, EOC = "<__dj__image>", "<|__dj__eoc|>"
SCENES = {
    "red_circle.jpg": Scene("red", "circle", 1),
    "two_blue_squares.jpg": Scene("blue", "square", 2),
    "green_triangle.jpg": Scene("green", "triangle", 1),
    "three_yellow_circles.jpg": Scene("yellow", "circle", 3),
    "blue_triangle.jpg": Scene("blue", "triangle", 1),
}
SAMPLES = [
    {"id": "one-image", "text": f"{IMG}A drawing I found.{EOC}", "images": ["images/red_circle.jpg"]},
    {
        "id": "two-images",
        "text": f"{IMG}{IMG} Two drawings side by side.{EOC}",
        "images": ["images/two_blue_squares.jpg", "images/green_triangle.jpg"],
    },
    {
        "id": "two-chunks",
        "text": f"{IMG} first chunk {EOC} some text {IMG} second chunk {EOC}",
        "images": ["images/three_yellow_circles.jpg", "images/blue_triangle.jpg"],
    },
    {"id": "no-images", "text": "A sample with no image: kept as it is.", "images": []},
]


def write(out: str, seed: int = 7) -> None:
    rng = random.Random(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    for name, scene in SCENES.items():
        draw_scene(scene, rng, "eval").save(os.path.join(out, "images", name), quality=90)
    with open(os.path.join(out, "samples.jsonl"), "w", encoding="utf-8") as f:
        for sample in SAMPLES:
            f.write(json.dumps(sample) + "\n")
    with open(os.path.join(out, "truth.json"), "w", encoding="utf-8") as f:
        json.dump({f"images/{k}": v.caption for k, v in SCENES.items()}, f, indent=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    write(parser.parse_args(argv).out)


if __name__ == "__main__":
    main()
