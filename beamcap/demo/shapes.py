"""Procedural pictures of coloured shapes with their true captions.

Every picture shows 1 to 3 non-overlapping circles, squares or triangles of one
of four colours (red, green, blue, yellow), and is JPEG round-tripped. Four
styles draw from different distributions:

``'train'``
    The first training stage's style (``python -m beamcap.demo.train``; the
    first release's training style, kept as it was so that the script still
    trains that release's model, from which the second stage starts):
    canvas sides 64-320 px, light grey backgrounds, axis-aligned shapes of
    10-40% of the short side, an outline on 30% of the pictures, JPEG quality
    55-95.

``'varied'``
    The second to fifth training stages' style (``python -m beamcap.demo.train
    --style varied``, see README: stage 5 scored 93-95% on
    ``'heldout'`` after them, against 30-39% before). Canvas sides log-uniform in 48-480 px
    (aspect ratio at most 2:1); backgrounds of any grey level or any hue at
    low saturation, 40% of them linear gradients at any angle, half with
    Gaussian noise (sigma up to 14); shape sizes log-uniform per picture
    (about 8-55% of the short side, less for 2 and 3 shapes) times 0.7-1.3 per
    shape; squares and triangles rotated to any angle (20% left upright),
    triangle corners jittered by up to 8%; fill colours jittered by +-30 per
    channel; half the pictures outlined (any grey, or a darker or lighter
    shade of the fill, 1 px up to 12% of the shape); half drawn at 2-4x and
    downsampled (anti-aliased); JPEG quality 20-98.

``'harder'``
    The sixth and seventh training stages' style: ``'varied'`` with two
    harder kinds of picture, the two where most of stage 5's held-out
    mistakes were. Half the backgrounds (the first colour of a gradient) are
    as bright as the shapes' own colour (ITU-R 601 luma within +-30 levels;
    grey, or a low-saturation hue), so that only hue tells the shapes from
    the background (yellow on light grey; red, green or blue on dark grey);
    and the shapes of one picture differ more in size (0.55-1.65x a base
    size each, not 0.7-1.3x, within the same bounds), so that a small shape
    beside large ones is still seen and counted.

``'heldout'``
    What ``python -m beamcap.demo.evaluate`` measures on; never used in
    training, and written separately from ``'train'``, ``'varied'`` and ``'harder'``. Long canvas side uniform
    in 64-400 px, aspect ratio uniform in 1-16:9 (short side at least 64 px);
    backgrounds chosen from a fixed menu: light greys (185-235), dark greys
    (35-95), off-whites, five pastel tints that are none of the four shape
    colours (lavender, peach, pink, aqua, lilac), or a horizontal, vertical or
    diagonal gradient between two of those; mild Gaussian noise (sigma 2-8) on
    40% of them; each shape's size (circle diameter, square side, triangle
    side) uniform in 10-45% of the short side for one shape, 10-38% for two,
    10-32% for three; squares and equilateral triangles rotated to any angle;
    fill colours jittered by +-20; half the pictures outlined in black, dark
    grey, white or a darker shade of the fill, 1-5 px wide (at most 15% of the
    smallest shape); a third
    anti-aliased (drawn at 3x); JPEG quality 30-100.

``'eval'``
    The first release's evaluation style, kept as it was because the bundled
    pictures in ``beamcap/demo/data`` (``make_data.py``) and some tests draw
    from it: a few fixed canvas sizes (96-320 px), an off-white background, a
    fixed dark 1 px outline, axis-aligned shapes of 14-34% of the short side
    (placed at random, may touch when they do not fit), JPEG quality 40, 70 or
    100.
"""

from __future__ import annotations

import colorsys
import functools
import io
import math
import random
from dataclasses import dataclass

import numpy as np
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
STYLES = ("train", "varied", "harder", "heldout", "eval")

# The held-out generator's pastel background tints (none of them is one of COLOURS).
HELDOUT_PASTELS = {
    "lavender": (228, 220, 245),
    "peach": (250, 222, 200),
    "pink": (248, 214, 226),
    "aqua": (206, 238, 236),
    "lilac": (236, 214, 240),
}


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    count: int

    @property
    def caption(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        return f"{COUNT_WORDS[self.count]} {self.colour} {noun}"


def _clip(rgb) -> tuple[int, int, int]:
    return tuple(max(0, min(255, round(c))) for c in rgb)


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, ...]:
    return _clip(c + rng.randint(-amount, amount) for c in rgb)


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


# --- shared geometry -------------------------------------------------------------------------------------------


def _bounding_radius(shape: str, size: float) -> float:
    """Radius of the circle around a shape of ``size`` (circle diameter, square side, triangle side)."""
    return size / {"circle": 2.0, "square": math.sqrt(2.0), "triangle": math.sqrt(3.0)}[shape]


def _polygon(shape: str, cx: float, cy: float, size: float, angle: float, corner_jitter: list[float] | None = None):
    """Corners of a square or equilateral triangle of side ``size`` centred on (cx, cy), turned by ``angle``."""
    corners = 4 if shape == "square" else 3
    radius = _bounding_radius(shape, size)
    start = angle - math.pi / 2 + (math.pi / 4 if shape == "square" else 0.0)
    points = []
    for k in range(corners):
        a = start + k * 2 * math.pi / corners
        r = radius * (1 + corner_jitter[k] if corner_jitter else 1)
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def _place(rng: random.Random, width: int, height: int, shape: str, sizes: list[float], gap: float):
    """Centres for shapes of ``sizes`` that fit the canvas without touching; sizes shrink until they fit."""
    for _ in range(40):
        placed: list[tuple[float, float, float]] = []
        for size in sizes:
            r = _bounding_radius(shape, size)
            if width - 2 * r - 2 <= 0 or height - 2 * r - 2 <= 0:
                break
            for _attempt in range(60):
                cx, cy = rng.uniform(r + 1, width - r - 1), rng.uniform(r + 1, height - r - 1)
                if all(math.hypot(cx - x, cy - y) > r + pr + gap for x, y, pr in placed):
                    placed.append((cx, cy, r))
                    break
            else:
                break
        if len(placed) == len(sizes):
            return [(cx, cy) for cx, cy, _ in placed], sizes
        sizes = [s * 0.9 for s in sizes]
    raise RuntimeError(f"cannot place {len(sizes)} {shape}s on a {width}x{height} canvas")


def _draw_shapes(image, shape, centres, sizes, fills, angles, outline, outline_width, scale, corner_jitters=None):
    draw = ImageDraw.Draw(image)
    for i, ((cx, cy), size, fill, angle) in enumerate(zip(centres, sizes, fills, angles, strict=True)):
        cx, cy, size = cx * scale, cy * scale, size * scale
        width = max(1, round(outline_width * scale)) if outline is not None else 0
        if shape == "circle":
            r = size / 2
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width or 1)
        else:
            jitter = corner_jitters[i] if corner_jitters else None
            points = _polygon(shape, cx, cy, size, angle, jitter)
            draw.polygon(points, fill=fill, outline=outline, width=width or 1)


def _gradient(width: int, height: int, a, b, angle: float) -> np.ndarray:
    """A linear gradient from colour ``a`` to ``b`` along direction ``angle`` (radians), float HxWx3."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    t = xs * math.cos(angle) + ys * math.sin(angle)
    t = (t - t.min()) / max(1e-6, t.max() - t.min())
    return np.asarray(a, np.float64) * (1 - t[..., None]) + np.asarray(b, np.float64) * t[..., None]


# --- 'varied' --------------------------------------------------------------------------------------------------


_LOW_SATURATION = (0.03, 0.35)  # the saturation of tinted 'varied' and 'harder' backgrounds


def _varied_colour(rng: random.Random) -> tuple[int, int, int]:
    if rng.random() < 0.5:
        g = rng.uniform(0, 255)
        return _clip((g, g, g))
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*_LOW_SATURATION), rng.uniform(0.15, 1.0))
    return _clip((255 * r, 255 * g, 255 * b))


@functools.cache
def _noise_tile() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((512, 512), dtype=np.float32)


def _varied_noise(width: int, height: int, sigma: float, rng: random.Random) -> np.ndarray:
    """Grey Gaussian noise (one value for all three channels): a random crop of a fixed, seeded tile."""
    x, y = rng.randrange(512 - min(width, 512) + 1), rng.randrange(512 - min(height, 512) + 1)
    tile = np.tile(_noise_tile(), (math.ceil(height / 512), math.ceil(width / 512)))
    return tile[y : y + height, x : x + width, None] * sigma


def _luma(rgb) -> float:
    """ITU-R 601 luma, as Pillow's ``convert('L')`` computes it."""
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _matched_colour(colour: str, rng: random.Random) -> tuple[int, int, int]:
    """A grey or low-saturation background about as bright (luma +-30) as the shapes' ``colour``."""
    target = max(0.0, min(255.0, _luma(COLOURS[colour]) + rng.uniform(-30, 30)))
    if rng.random() < 0.5:
        return _clip((target, target, target))
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*_LOW_SATURATION), 1.0)
    factor = target / max(1.0, _luma((255 * r, 255 * g, 255 * b)))
    return _clip((255 * r * factor, 255 * g * factor, 255 * b * factor))


def _draw_varied(scene: Scene, rng: random.Random, harder: bool = False) -> Image.Image:
    """A 'varied' picture; with ``harder``, a 'harder' one (backgrounds as bright as the shapes, sizes spread)."""
    while True:
        width, height = (round(math.exp(rng.uniform(math.log(48), math.log(480)))) for _ in range(2))
        if max(width, height) <= 2 * min(width, height):
            break
    short = min(width, height)
    scale = min(rng.randint(2, 4), 1024 // max(width, height)) if rng.random() < 0.5 else 1
    first = _matched_colour(scene.colour, rng) if harder and rng.random() < 0.5 else _varied_colour(rng)
    if rng.random() < 0.4:
        ramp = _gradient(16, 16, first, _varied_colour(rng), rng.uniform(0, 2 * math.pi))
        image = Image.fromarray(np.rint(ramp).astype(np.uint8), "RGB")
        image = image.resize((width * scale, height * scale), Image.Resampling.BILINEAR)
    else:
        image = Image.new("RGB", (width * scale, height * scale), first)
    hi = {1: 0.55, 2: 0.42, 3: 0.36}[scene.count]
    base = math.exp(rng.uniform(math.log(0.08), math.log(hi)))
    spread = (0.55, 1.65) if harder else (0.7, 1.3)
    sizes = [short * min(hi, max(0.06, base * rng.uniform(*spread))) for _ in range(scene.count)]
    fills = [_jitter(COLOURS[scene.colour], rng, 30) for _ in range(scene.count)]
    outline, outline_width = None, 1.0
    if rng.random() < 0.5:
        kind = rng.random()
        if kind < 0.5:
            g = rng.randint(0, 255)
            outline = (g, g, g)
        else:
            factor = rng.uniform(0.3, 0.7) if kind < 0.8 else rng.uniform(1.2, 1.5)
            outline = _clip(c * factor for c in fills[0])
        outline_width = rng.uniform(1, max(1.0, 0.12 * min(sizes)))
    gap = rng.uniform(2, 0.08 * short + 2) + outline_width
    centres, sizes = _place(rng, width, height, scene.shape, sizes, gap)
    upright = rng.random() < 0.2
    angles = [0.0 if upright else rng.uniform(0, 2 * math.pi) for _ in sizes]
    jitters = [[rng.uniform(-0.08, 0.08) for _ in range(3)] for _ in sizes] if scene.shape == "triangle" else None
    _draw_shapes(image, scene.shape, centres, sizes, fills, angles, outline, outline_width, scale, jitters)
    if scale > 1:
        image = image.reduce(scale)
    if rng.random() < 0.5:
        pixels = np.asarray(image, np.float32) + _varied_noise(width, height, rng.uniform(0, 14), rng)
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    return _jpeg(image, rng.randint(20, 98))


# --- 'heldout' -------------------------------------------------------------------------------------------------


def _heldout_plain(rng: random.Random) -> tuple[int, int, int]:
    kind = rng.choice(["light grey", "dark grey", "off-white", "pastel"])
    if kind == "light grey":
        g = rng.randint(185, 235)
        return (g, g, g)
    if kind == "dark grey":
        g = rng.randint(35, 95)
        return (g, g, g)
    if kind == "off-white":
        return (rng.randint(242, 255), rng.randint(238, 252), rng.randint(225, 245))
    return _jitter(HELDOUT_PASTELS[rng.choice(sorted(HELDOUT_PASTELS))], rng, 8)


def _heldout_render(background: np.ndarray, shape, centres, sizes, fills, angles, outline, outline_width, scale):
    """The shapes drawn on their own layer (at ``scale`` x, then box-filtered down) and laid over ``background``."""
    height, width = background.shape[:2]
    big = (width * scale, height * scale)
    layer, mask = Image.new("RGB", big, (0, 0, 0)), Image.new("L", big, 0)
    _draw_shapes(layer, shape, centres, sizes, fills, angles, outline, outline_width, scale)
    _draw_shapes(mask, shape, centres, sizes, [255] * len(fills), angles, outline and 255, outline_width, scale)
    if scale > 1:
        layer, mask = (
            layer.resize((width, height), Image.Resampling.BOX),
            mask.resize((width, height), Image.Resampling.BOX),
        )
    alpha = np.asarray(mask, np.float64)[..., None] / 255.0
    return background * (1 - alpha) + np.asarray(layer, np.float64) * alpha


def _draw_heldout(scene: Scene, rng: random.Random) -> Image.Image:
    nprng = np.random.default_rng(rng.getrandbits(64))
    long = rng.randint(64, 400)
    short = max(64, round(long / rng.uniform(1.0, 16 / 9)))
    width, height = (long, short) if rng.random() < 0.5 else (short, long)
    if rng.random() < 0.25:
        angle = rng.choice([0.0, math.pi / 2, math.pi / 4, 3 * math.pi / 4])
        background = _gradient(width, height, _heldout_plain(rng), _heldout_plain(rng), angle)
    else:
        background = np.broadcast_to(np.asarray(_heldout_plain(rng), np.float64), (height, width, 3)).copy()
    hi = {1: 0.45, 2: 0.38, 3: 0.32}[scene.count]
    sizes = [short * rng.uniform(0.10, hi) for _ in range(scene.count)]
    fills = [_jitter(COLOURS[scene.colour], rng, 20) for _ in range(scene.count)]
    outline, outline_width = None, 1
    if rng.random() < 0.5:
        kind = rng.choice(["black", "dark grey", "white", "shade"])
        outline = {"black": (15, 15, 15), "dark grey": (70, 70, 70), "white": (250, 250, 250)}.get(kind) or _clip(
            c * 0.55 for c in fills[0]
        )
        outline_width = rng.randint(1, 5)
    centres, sizes = _place(rng, width, height, scene.shape, sizes, max(3.0, 0.03 * short) + outline_width)
    outline_width = min(outline_width, max(1, math.floor(0.15 * min(sizes))))  # the fill stays visible
    angles = [rng.uniform(0, 2 * math.pi) for _ in sizes]
    scale = 3 if rng.random() < 1 / 3 else 1
    pixels = _heldout_render(background, scene.shape, centres, sizes, fills, angles, outline, outline_width, scale)
    if rng.random() < 0.4:
        pixels = pixels + nprng.normal(0.0, rng.uniform(2, 8), pixels.shape)  # colour noise, each channel its own
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    return _jpeg(image, rng.randint(30, 100))


# --- 'train' and 'eval' (the first release's styles: training stage 1 and the bundled pictures) -------------


def _draw_legacy_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, outline, rng):
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


def _draw_legacy(scene: Scene, rng: random.Random, style: str) -> Image.Image:
    """The first release's two styles: 'train' (stage 1's training pictures, 15% of stage 2's) and 'eval'."""
    if style == "train":
        width, height = rng.randint(64, 320), rng.randint(64, 320)
        tint = rng.randint(200, 255)
        background = _jitter((tint, tint, tint), rng, 25)
        outline = _jitter((50, 50, 50), rng, 40) if rng.random() < 0.3 else None
        radius_range, quality = (0.05, 0.2), rng.randint(55, 95)
    else:
        width, height = rng.choice([(200, 150), (150, 200), (96, 96), (240, 180), (320, 240)])
        background = _jitter((235, 235, 225), rng, 15)
        radius_range, outline, quality = (0.07, 0.17), (60, 60, 60), rng.choice([40, 70, 100])
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
        _draw_legacy_shape(draw, scene.shape, cx, cy, r, _jitter(COLOURS[scene.colour], rng, 20), outline, rng)
    return _jpeg(image, quality)


def draw_scene(scene: Scene, rng: random.Random, style: str = "train") -> Image.Image:
    """A picture of ``scene``, drawn in ``style`` (one of :data:`STYLES`), JPEG round-tripped."""
    if style in ("varied", "harder"):
        return _draw_varied(scene, rng, harder=style == "harder")
    if style == "heldout":
        return _draw_heldout(scene, rng)
    if style in ("train", "eval"):
        return _draw_legacy(scene, rng, style)
    raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def random_scene(rng: random.Random, counts: tuple[int, ...] = (1, 2, 3)) -> Scene:
    return Scene(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(counts))


def vocabulary() -> list[str]:
    words = {"a", "two", "three", *COLOURS, *SHAPES, *(s + "s" for s in SHAPES)}
    for prompt in PROMPTS:
        words.update(prompt.split())
    return sorted(words)
