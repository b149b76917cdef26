"""Choosing among caption candidates: ``random_any``, ``similar_one_simhash``, ``all``.

Pure functions, no Beam and no torch.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from enum import Enum

from simhash import Simhash

from beamcap.seeding import derive_seed


class KeepMode(str, Enum):
    """How the ``caption_num`` candidates of an image are kept."""

    RANDOM_ANY = "random_any"
    SIMILAR_ONE_SIMHASH = "similar_one_simhash"
    ALL = "all"


def _md5_64(data: bytes) -> int:
    """First 8 bytes of the MD5 digest, big-endian: the reference's shingle hash."""
    return int.from_bytes(hashlib.md5(data).digest()[:8], "big")


def simhash_fingerprint(text: str) -> int:
    """The 64-bit SimHash of ``text``, bit for bit as Data-Juicer computes it.

    The text is lowercased and split on the space character only (empty tokens
    dropped); each pair of neighbouring tokens joined by one space is a
    shingle, hashed by the first 8 bytes of its MD5 digest; bit ``b`` of the
    result is set when more shingle hashes have it set than unset. Texts of
    fewer than two tokens have fingerprint 0.

    >>> hex(simhash_fingerprint('a photo of a cat'))
    '0x8214700201400c02'
    """
    tokens = [t for t in text.lower().split(" ") if t]
    shingles = [f"{a} {b}" for a, b in zip(tokens, tokens[1:], strict=False)]
    if not shingles:
        return 0
    return Simhash(shingles, f=64, hashfunc=_md5_64).value


def hamming_distance(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def most_similar(reference_text: str, candidates: Sequence[str]) -> int:
    """Index of the candidate whose SimHash is closest to ``reference_text``'s (ties: the first)."""
    return closest(simhash_fingerprint(reference_text), candidates)


def closest(target: int, candidates: Sequence[str]) -> int:
    """Index of the candidate whose SimHash is closest to the fingerprint ``target`` (ties: the first)."""
    distances = [hamming_distance(target, simhash_fingerprint(c)) for c in candidates]
    return distances.index(min(distances))


def sample_rng(seed: int | None, sample_key: str) -> random.Random:
    """The random source for one sample's ``random_any`` choices.

    With a seed, it is a function of the seed and the sample only, so a retried
    bundle or another batching chooses the same candidates. Without one, it is
    seeded from the OS.
    """
    if seed is None:
        return random.Random()
    return random.Random(derive_seed(seed, "random_any", sample_key))


def choose_captions(
    mode: KeepMode,
    candidates: Sequence[Sequence[str]],
    reference_texts: Sequence[str],
    rng: random.Random | None,
) -> list[list[str]]:
    """Reduce each image's candidates to the captions of the K generated samples.

    Args:
        mode: the keep mode.
        candidates: ``candidates[j]`` holds the ``caption_num`` candidates of image j.
        reference_texts: ``reference_texts[j]`` is the plain text of image j's
            chunk (used by ``similar_one_simhash`` only).
        rng: the sample's random source (needed by ``random_any`` only).

    Returns:
        ``result[i][j]``: the caption of image j in generated sample i.
    """
    if mode is KeepMode.ALL:
        caption_num = len(candidates[0]) if candidates else 0
        return [[cands[i] for cands in candidates] for i in range(caption_num)]
    if mode is KeepMode.RANDOM_ANY:
        return [[rng.choice(cands) for cands in candidates]]
    if mode is KeepMode.SIMILAR_ONE_SIMHASH:
        targets = {ref: simhash_fingerprint(ref) for ref in set(reference_texts)}  # once per chunk, not per image
        return [[cands[closest(targets[ref], cands)] for cands, ref in zip(candidates, reference_texts, strict=True)]]
    raise ValueError(f"unknown keep mode {mode!r}")
