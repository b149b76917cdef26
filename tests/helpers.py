"""Helpers for tests: run the DoFn directly (no Beam), and picklable matchers."""

from __future__ import annotations

import json
import random
import re
import socket
from collections.abc import Iterable

from apache_beam.pvalue import TaggedOutput
from apache_beam.testing.util import BeamAssertException
from apache_beam.transforms.window import GlobalWindows

from beamcap.batching import into_calls
from beamcap.config import CaptionConfig
from beamcap.dofn import FAILED, ORIGINAL, CaptionDoFn
from beamcap.samples import parse

EOC = "<|__dj__eoc|>"
IMG = "<__dj__image>"


def printed_summary(stdout: str) -> dict:
    """The counts a job printed on its ``beamcap summary:`` line."""
    return json.loads(stdout.split("beamcap summary:", 1)[1].splitlines()[0])


def process(dofn: CaptionDoFn, config: CaptionConfig, samples: list) -> dict[str, list]:
    """``samples`` parsed and cut into calls as the transform does, each call through ``process`` outside Beam;
    the emitted samples by tag (main output under 'generated')."""
    out: dict[str, list] = {"generated": [], ORIGINAL: [], FAILED: []}
    place = GlobalWindows.windowed_value(None)
    works = []
    for sample in samples:
        work = parse(sample, config)
        work.timestamp, work.window, work.pane = place.timestamp, place.windows[0], place.pane_info
        works.append(work)
    for call in into_calls(works, config.gpu_batch_size):
        for item in dofn.process(call):
            tag, value = (item.tag, item.value) if isinstance(item, TaggedOutput) else ("generated", item)
            out[tag].append(value.value)
    return out


def run_dofn(config: CaptionConfig, samples: Iterable, batch_size: int = 1) -> dict[str, list]:
    """Run the captioning DoFn outside Beam on batches of ``batch_size`` samples; the emitted samples by tag."""
    dofn = CaptionDoFn(config, handle_failures=True)
    dofn.setup()
    samples = list(samples)
    out: dict[str, list] = {"generated": [], ORIGINAL: [], FAILED: []}
    for start in range(0, len(samples), batch_size):
        for tag, values in process(dofn, config, samples[start : start + batch_size]).items():
            out[tag] += values
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


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free now, outside the kernel's ephemeral range: the processes a test then
    starts (JVMs, Beam's job service) open sockets on ephemeral ports of their own while they start, and one of
    those could take a port picked from that range before its server binds it."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(v) for v in f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default; macOS's range starts at 49152, above it
    below, above = range(max(1024, low - 12000), low), range(high + 1, 65536)
    candidates = below if len(below) >= len(above) else above
    held: list[socket.socket] = []
    try:
        # SystemRandom: the module's generator may have been seeded by an earlier test, and two suites on one
        # machine would then try the same ports in the same order.
        for port in random.SystemRandom().sample(candidates, min(len(candidates), 2000)):
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            held.append(s)  # kept bound until all are chosen, so no port is handed out twice
            if len(held) == n:
                return [s.getsockname()[1] for s in held]
        raise RuntimeError(f"fewer than {n} free ports outside the ephemeral range {low}-{high}")
    finally:
        for s in held:
            s.close()
