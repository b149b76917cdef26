"""Procedural pictures of coloured shapes with their true captions.

Two styles draw from different distributions: ``'train'`` for training and
``'eval'`` (other canvas sizes, shape sizes, positions, tints, outlines and
JPEG qualities) for measuring accuracy on pictures the model never saw the
like of.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 70, 215),
    "yellow": (235, 205, 30),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
PROMPTS = ("a photo of", "a picture of")


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    count: int

    @property
    def caption(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        return f"{COUNT_WORDS[self.count]} {self.colour} {noun}"


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, ...]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, outline, rng):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline)
    else:
        turn = rng.uniform(-0.3, 0.3)
        points = [
            (cx + r * math.sin(turn + k * 2 * math.pi / 3), cy - r * math.cos(turn + k * 2 * math.pi / 3))
            for k in range(3)
        ]
        draw.polygon(points, fill=fill, outline=outline)


def draw_scene(scene: Scene, rng: random.Random, style: str = "train") -> Image.Image:
    """A picture of ``scene``, drawn in ``style`` ('train' or 'eval'), JPEG round-tripped."""
    if style == "train":
        width, height = rng.randint(64, 320), rng.randint(64, 320)
        tint = rng.randint(200, 255)
        background = _jitter((tint, tint, tint), rng, 25)
        outline = _jitter((50, 50, 50), rng, 40) if rng.random() < 0.3 else None
        radius_range, quality = (0.05, 0.2), rng.randint(55, 95)
    elif style == "eval":
        width, height = rng.choice([(200, 150), (150, 200), (96, 96), (240, 180), (320, 240)])
        background = _jitter((235, 235, 225), rng, 15)
        radius_range, outline, quality = (0.07, 0.17), (60, 60, 60), rng.choice([40, 70, 100])
    else:
        raise ValueError(f"style must be 'train' or 'eval', got {style!r}")
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    placed: list[tuple[float, float, float]] = []
    for _ in range(scene.count):
        for _attempt in range(100):
            r = side * rng.uniform(*radius_range)
            cx, cy = rng.uniform(r + 1, width - r - 1), rng.uniform(r + 1, height - r - 1)
            if all(math.hypot(cx - x, cy - y) > r + pr + 2 for x, y, pr in placed):
                break
        placed.append((cx, cy, r))
        _draw_shape(draw, scene.shape, cx, cy, r, _jitter(COLOURS[scene.colour], rng, 20), outline, rng)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def random_scene(rng: random.Random, counts: tuple[int, ...] = (1, 2, 3)) -> Scene:
    return Scene(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(counts))


def vocabulary() -> list[str]:
    words = {"a", "two", "three", *COLOURS, *SHAPES, *(s + "s" for s in SHAPES)}
    for prompt in PROMPTS:
        words.update(prompt.split())
    return sorted(words)
