"""The demo's picture generators: seeded, in range, distinct styles; the bundled pictures' style unchanged."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
from PIL import Image

from beamcap import demo_model_path
from beamcap.demo import make_data
from beamcap.demo.evaluate import judge, make_pictures
from beamcap.demo.shapes import STYLES, Scene, _bounding_radius, _place, draw_scene, random_scene

DATA = os.path.join(os.path.dirname(demo_model_path()), "data")


@pytest.mark.parametrize("style", STYLES)
def test_each_style_is_seeded(style):
    def pictures(seed):
        rng = random.Random(seed)
        return [draw_scene(random_scene(rng), rng, style).tobytes() for _ in range(12)]

    assert pictures(3) == pictures(3)
    assert pictures(3) != pictures(4)


def test_heldout_canvases_are_in_range():
    rng = random.Random(0)
    for _ in range(200):
        image = draw_scene(random_scene(rng), rng, "heldout")
        long, short = max(image.size), min(image.size)
        assert 64 <= short <= long <= 400
        assert long / short <= 16 / 9 + 0.02


@pytest.mark.parametrize("training", ["train", "varied", "harder"])
def test_heldout_differs_from_training(training):
    """Same scenes and seeds, other pictures: the held-out generator is neither training one."""
    scene = Scene("red", "triangle", 2)
    for seed in range(5):
        a, b = draw_scene(scene, random.Random(seed), training), draw_scene(scene, random.Random(seed), "heldout")
        assert a.size != b.size or a.tobytes() != b.tobytes()


def test_harder_pictures_have_backgrounds_as_bright_as_the_shapes():
    """'harder' draws half the backgrounds at the shapes' own luma (+-30): only hue sets them apart."""
    from beamcap.demo.shapes import COLOURS, _luma, _matched_colour

    rng = random.Random(0)
    for colour, rgb in COLOURS.items():
        backgrounds = [_matched_colour(colour, rng) for _ in range(200)]
        assert all(abs(_luma(b) - _luma(rgb)) <= 32 for b in backgrounds), colour
        assert any(len(set(b)) == 1 for b in backgrounds) and any(len(set(b)) > 1 for b in backgrounds), colour

    def near_luma(style):  # pictures whose corner is about as bright as the yellow shapes
        scene, near = Scene("yellow", "square", 1), 0
        for seed in range(80):
            picture = np.asarray(draw_scene(scene, random.Random(seed), style).convert("L"), np.float64)
            near += abs(picture[:3, :3].mean() - _luma(COLOURS["yellow"])) < 45
        return near

    varied, harder = near_luma("varied"), near_luma("harder")
    assert varied + 16 <= harder <= 72, (varied, harder)  # about half more, not all


def test_harder_pictures_spread_the_sizes_of_their_shapes(monkeypatch):
    """In one 'harder' picture, shapes differ up to 3x in size (0.55-1.65x a base), in 'varied' at most 1.86x."""
    from beamcap.demo import shapes

    ratios, place = [], shapes._place

    def spy(rng, width, height, shape, sizes, gap):
        ratios.append(max(sizes) / min(sizes))
        return place(rng, width, height, shape, sizes, gap)

    monkeypatch.setattr(shapes, "_place", spy)
    widest = {}
    for style in ("varied", "harder"):
        ratios.clear()
        rng = random.Random(1)
        for _ in range(150):
            draw_scene(Scene("red", "circle", 3), rng, style)
        widest[style] = max(ratios)
    assert widest["varied"] <= 1.3 / 0.7 + 1e-9 < 2.2 < widest["harder"] <= 1.65 / 0.55 + 1e-9, widest


@pytest.mark.parametrize("count", [1, 2, 3])
def test_shapes_never_touch(count):
    rng = random.Random(count)
    for _ in range(300):
        width, height = rng.randint(64, 400), rng.randint(64, 400)
        sizes = [min(width, height) * rng.uniform(0.1, 0.45) for _ in range(count)]
        shape = rng.choice(["circle", "square", "triangle"])
        centres, placed = _place(rng, width, height, shape, sizes, gap=3.0)
        radii = [_bounding_radius(shape, s) for s in placed]
        for (x, y), r in zip(centres, radii, strict=True):
            assert r < x < width - r and r < y < height - r
        for i in range(count):
            for j in range(i):
                (x1, y1), (x2, y2) = centres[i], centres[j]
                assert np.hypot(x1 - x2, y1 - y2) > radii[i] + radii[j] + 3.0


def test_bundled_pictures_still_come_from_the_eval_style(tmp_path):
    """make_data.py, rerun, draws the bundled pictures again (the 'eval' style is kept as it was)."""
    make_data.write(str(tmp_path))
    assert json.load(open(tmp_path / "truth.json")) == json.load(open(os.path.join(DATA, "truth.json")))
    for name in make_data.SCENES:
        ours = np.asarray(Image.open(tmp_path / "images" / name), np.int16)
        bundled = np.asarray(Image.open(os.path.join(DATA, "images", name)), np.int16)
        assert ours.shape == bundled.shape and np.abs(ours - bundled).mean() < 1.0, name


def test_evaluation_pictures_and_judging():
    scenes, images = make_pictures(4, seed=1)
    assert [s.count for s in scenes] == [1] * 4 + [2] * 4 + [3] * 4 and len(images) == 12
    assert judge(Scene("red", "circle", 1), "a red circle") == dict.fromkeys(
        ["colour", "shape", "colour_and_shape", "all"], True
    )
    assert judge(Scene("red", "circle", 2), "a red circle")["all"] is False  # count and plural both wrong
    assert judge(Scene("red", "circle", 2), "three red circles")["colour_and_shape"] is True
    assert judge(Scene("red", "circle", 1), "a red blue circle")["colour"] is False
    # a caption that begins with a training prompt is judged on what follows it, count word included
    assert judge(Scene("red", "circle", 2), "a photo of two red circles")["all"] is True
    assert judge(Scene("red", "circle", 2), "A Picture of two red circles")["all"] is True
    assert judge(Scene("red", "circle", 2), "a photo of a red circle")["all"] is False
    assert judge(Scene("red", "circle", 1), "a photo of two red circles")["all"] is False
    assert judge(Scene("red", "circle", 1), "a photo of a red circle")["all"] is True
    assert judge(Scene("red", "circle", 1), "a photo")["all"] is False
    assert judge(Scene("red", "circle", 2), "A photo of: two red circles.")["all"] is True
    assert judge(Scene("red", "circle", 2), "two red circles-ish")["all"] is True
    assert judge(Scene("red", "circle", 2), "two reddish circles")["colour"] is False
