"""Data-Juicer's text format: special tokens, chunks and caption insertion.

Pure functions, no Beam and no torch. A sample's text is split on the
end-of-chunk token; each non-empty chunk keeps only its special tokens, and a
generated caption is written right after the image token it belongs to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

DEFAULT_IMAGE_TOKEN = "<__dj__image>"
DEFAULT_AUDIO_TOKEN = "<__dj__audio>"
DEFAULT_VIDEO_TOKEN = "<__dj__video>"
DEFAULT_EOC_TOKEN = "<|__dj__eoc|>"


@dataclass(frozen=True)
class SpecialTokens:
    """The special tokens of a Data-Juicer dataset (its defaults unless a recipe overrides them)."""

    image: str = DEFAULT_IMAGE_TOKEN
    audio: str = DEFAULT_AUDIO_TOKEN
    video: str = DEFAULT_VIDEO_TOKEN
    eoc: str = DEFAULT_EOC_TOKEN

    def all(self) -> tuple[str, ...]:
        return (self.image, self.audio, self.video, self.eoc)

    @cached_property
    def _pattern(self) -> re.Pattern[str]:
        # Longest first, so a token that contains another one is matched whole.
        tokens = sorted(set(self.all()), key=len, reverse=True)
        return re.compile("|".join(re.escape(t) for t in tokens))

    def find_all(self, text: str) -> list[str]:
        """The special tokens of ``text``, in order of appearance."""
        return self._pattern.findall(text)


@dataclass(frozen=True)
class Chunk:
    """One non-empty chunk of a sample's text.

    Attributes:
        tokens: the chunk's special tokens in order (all plain text dropped).
        plain_text: the chunk with special tokens removed, stripped at the ends
            (what ``similar_one_simhash`` compares candidates against).
        image_indices: for each image token of the chunk, the index into the
            sample's image list it refers to.
    """

    tokens: tuple[str, ...]
    plain_text: str
    image_indices: tuple[int, ...]


@dataclass(frozen=True)
class TextPlan:
    """What a sample's text asks for: its chunks and the images they use."""

    chunks: tuple[Chunk, ...]

    @property
    def image_indices(self) -> tuple[int, ...]:
        """Every image position referenced by a token, in text order."""
        return tuple(i for chunk in self.chunks for i in chunk.image_indices)

    @property
    def num_image_tokens(self) -> int:
        return len(self.image_indices)


def strip_special_tokens(text: str, special: SpecialTokens) -> str:
    """``text`` without any special token, stripped at both ends."""
    for token in special.all():
        text = text.replace(token, "")
    return text.strip()


def plan_text(text: str, special: SpecialTokens = SpecialTokens()) -> TextPlan:
    """Split ``text`` into its non-empty chunks and number its image tokens.

    Image tokens are matched to images in order across chunks: the first image
    token of the text is image 0, the next one image 1, and so on.
    """
    chunks = []
    next_image = 0
    for raw in text.split(special.eoc):
        if not raw.strip():
            continue
        tokens = tuple(special.find_all(raw))
        n_images = sum(1 for t in tokens if t == special.image)
        chunks.append(
            Chunk(
                tokens=tokens,
                plain_text=strip_special_tokens(raw, special),
                image_indices=tuple(range(next_image, next_image + n_images)),
            )
        )
        next_image += n_images
    return TextPlan(tuple(chunks))


def render_text(plan: TextPlan, captions: dict[int, str], special: SpecialTokens = SpecialTokens()) -> str:
    """The generated text: each chunk's special tokens, each image token
    followed by ``" " + caption + " "`` for its own image, then the eoc token.

    Args:
        plan: the sample's plan from :func:`plan_text`.
        captions: the caption chosen for each image index the plan references.
    """
    parts: list[str] = []
    for chunk in plan.chunks:
        images = iter(chunk.image_indices)
        for token in chunk.tokens:
            parts.append(token)
            if token == special.image:
                parts.append(f" {captions[next(images)]} ")
        parts.append(special.eoc)
    return "".join(parts)
