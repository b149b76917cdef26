"""The demo captioner that beamcap trains itself (``python -m beamcap.demo.train``)."""

from __future__ import annotations

import os

_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")


def demo_model_path() -> str:
    """The folder of the bundled demo model (loadable with ``from_pretrained``)."""
    if not os.path.isfile(os.path.join(_MODEL_DIR, "config.json")):
        raise FileNotFoundError(
            f"The demo model is missing from {_MODEL_DIR}; rebuild it with the seven `python -m beamcap.demo.train` "
            "commands in README.md ('The demo captioner') or in that module's docstring."
        )
    return _MODEL_DIR
