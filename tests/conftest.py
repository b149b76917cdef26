"""Shared fixtures: offline settings, tiny models of each family, real image files."""

from __future__ import annotations

import os

# Every run is offline: a test that reaches for the hub fails at once instead of hanging.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from beamcap.testing import models as tiny_models  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Build each tiny model family once per session, lazily."""
    root = tmp_path_factory.mktemp("models")
    cache: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in cache:
            cache[family] = tiny_models.BUILDERS[family](str(root / family))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def blip_dir(model_dirs):
    return model_dirs("blip")


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
    """A folder of small real image files: <colour>.jpg and <colour>.png."""
    root = tmp_path_factory.mktemp("images")
    for name, rgb in COLOURS.items():
        image = Image.new("RGB", (48, 36), rgb)
        image.save(root / f"{name}.jpg", quality=90)
        image.save(root / f"{name}.png")
    return root
