"""Running a batched call so that one bad item cannot fail the others.

Pure Python, no torch: the caller says what an out-of-memory error looks like.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

_LOGGER = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def call_isolating(
    fn: Callable[[Sequence[T]], Sequence[R]],
    items: Sequence[T],
    *,
    is_oom: Callable[[BaseException], bool] = lambda e: False,
    on_oom: Callable[[], None] = lambda: None,
    splits: Callable[[BaseException], bool] = lambda e: True,
) -> list[R | Exception]:
    """``fn(items)``, one result per item; on failure, retried on halves.

    A call that raises is split in two and each half retried, down to single
    items; a single item that still fails gets its exception as its result.
    Out-of-memory errors call ``on_oom`` (free the cache) before the split, so
    a batch too large for the device is run in halves instead of failing. An
    error for which ``splits`` is false (one that no smaller call can cure) is
    every item's result at once.

    Returns:
        For each item, in order, its result or the ``Exception`` it failed with.
    """
    if not items:
        return []
    try:
        results = list(fn(items))
    except Exception as e:  # noqa: BLE001 - every failure is isolated and reported per item
        oom = is_oom(e)
        if oom:
            on_oom()
        if len(items) == 1 or not splits(e):
            return [e] * len(items)
        half = len(items) // 2
        _LOGGER.warning(
            "A call on %d items failed (%s: %s); retrying as %d + %d.",
            len(items),
            "out of memory" if oom else type(e).__name__,
            e,
            half,
            len(items) - half,
        )
        options = {"is_oom": is_oom, "on_oom": on_oom, "splits": splits}
        return call_isolating(fn, items[:half], **options) + call_isolating(fn, items[half:], **options)
    if len(results) != len(items):
        raise RuntimeError(f"expected {len(items)} results, got {len(results)}")
    return results
