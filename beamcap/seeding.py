"""Seeds derived from a user seed and stable parts (sample key, image index, ...).

Pure Python: the same value in every process, run and batch arrangement.
"""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed that is a function of ``seed`` and ``parts`` only."""
    text = "\x00".join([str(seed), *(str(p) for p in parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1
