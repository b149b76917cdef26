"""Model families: one module each, and the registry that picks a model's family.

A family is picked from the loaded config and processor, never from the
model's name. Adding a family means one module here (a :class:`Family`
subclass), its entry in :data:`FAMILIES`, a tiny model builder in
``beamcap/testing/models.py`` and its row in the family test table
(``tests/test_families.py``).
"""

from __future__ import annotations

from typing import Any

from beamcap.families.base import Family, Kind, Processors
from beamcap.families.blip import Blip
from beamcap.families.blip2 import Blip2
from beamcap.families.chat import DEFAULT_CHAT_PROMPT, Chat
from beamcap.families.florence2 import DEFAULT_TASK_PROMPT, Florence2
from beamcap.families.git import Git
from beamcap.families.vision_encoder_decoder import VisionEncoderDecoder

FAMILIES: tuple[type[Family], ...] = (VisionEncoderDecoder, Florence2, Chat, Blip, Blip2, Git)
"""In order of precedence: task tokens before a chat template, a chat template before the prefix families.
A model none of them claims is a generic prefix model (:class:`Family`)."""


def family_for(model_config: Any, processors: Processors | None) -> type[Family]:
    """The family of a model with this config and these processors (None: before they are loaded, which decides
    how to load them)."""
    return next((family for family in FAMILIES if family.claims(model_config, processors)), Family)


__all__ = [
    "DEFAULT_CHAT_PROMPT",
    "DEFAULT_TASK_PROMPT",
    "FAMILIES",
    "Family",
    "Kind",
    "Processors",
    "family_for",
]
