"""Helpers for tests: run the DoFn directly (no Beam), and picklable matchers."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

from apache_beam.testing.util import BeamAssertException

from beamcap.config import CaptionConfig
from beamcap.dofn import FAILED, ORIGINAL, CaptionDoFn

EOC = "<|__dj__eoc|>"
IMG = "<__dj__image>"


def run_dofn(config: CaptionConfig, samples: Iterable, batch_size: int = 1) -> dict[str, list]:
    """Run the captioning DoFn outside Beam on batches of ``batch_size``;
    returns the emitted elements by tag (main output under 'generated')."""
    from apache_beam.pvalue import TaggedOutput

    dofn = CaptionDoFn(config, handle_failures=True)
    dofn.setup()
    samples = list(samples)
    out: dict[str, list] = {"generated": [], ORIGINAL: [], FAILED: []}
    for start in range(0, len(samples), batch_size):
        for item in dofn.process(samples[start : start + batch_size]):
            if isinstance(item, TaggedOutput):
                out[item.tag].append(item.value)
            else:
                out["generated"].append(item)
    return out


def canonical(elements: Iterable) -> list[str]:
    return sorted(json.dumps(e, sort_keys=True, default=repr) for e in elements)


def same_elements(expected: list):
    """Matcher: the PCollection holds exactly ``expected`` (as a multiset)."""
    want = canonical(expected)

    def check(actual):
        got = canonical(actual)
        if got != want:
            raise BeamAssertException(f"expected {len(want)} elements, got {len(got)}:\n{got}\n!=\n{want}")

    return check


GENERATED_TEXT = re.compile(r"^(<__dj__image> [^<]* )+<\|__dj__eoc\|>$")


def has_counts(originals: int, generated: int, text_key: str = "text"):
    """Matcher: how many outputs are originals (text unchanged) and generated (caption format)."""

    def check(actual):
        gen = [s for s in actual if s[text_key].startswith(IMG) and s.get("_orig") != s[text_key]]
        orig = [s for s in actual if s.get("_orig") == s[text_key]]
        if (len(orig), len(gen)) != (originals, generated) or len(actual) != originals + generated:
            raise BeamAssertException(
                f"expected {originals} originals + {generated} generated, got {len(orig)} + {len(gen)} "
                f"of {len(actual)}: {actual}"
            )

    return check
