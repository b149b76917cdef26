"""Soak: 10,000 samples, 1% bad, through the public transform on a tiny model."""

from __future__ import annotations

import os
import threading
import time

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that
from helpers import IMG

from beamcap import METRICS_NAMESPACE, CaptionImages

N, BAD_EVERY = 10_000, 100


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def count_is(expected: int):
    def check(actual):
        assert len(actual) == expected, f"expected {expected}, got {len(actual)}"

    return check


@pytest.mark.slow
def test_soak_10k_samples_with_1_percent_bad(blip_dir, image_dir):
    images = [str(image_dir / f"{c}.jpg") for c in ("red", "green", "blue", "yellow")]
    samples = []
    for i in range(N):
        if i % BAD_EVERY == 0:
            samples.append({"id": i, "text": IMG, "images": [str(image_dir / f"missing-{i}.jpg")]})
        else:
            samples.append({"id": i, "text": f"{IMG} sample {i}", "images": [images[i % 4]]})
    bad = N // BAD_EVERY
    rss, stop = [], threading.Event()

    def sample_rss():
        while not stop.is_set():
            rss.append(_rss_mb())
            time.sleep(0.25)

    p = TestPipeline()
    result = (
        p
        | beam.Create(samples)
        | CaptionImages(
            blip_dir, max_new_tokens=2, gpu_batch_size=16, keep_original_sample=True
        ).with_exception_handling()
    )
    assert_that(result.good, count_is(2 * (N - bad)), label="good")
    assert_that(result.failed, count_is(bad), label="failed")
    watcher = threading.Thread(target=sample_rss, daemon=True)
    watcher.start()
    start = time.perf_counter()
    run = p.run()
    run.wait_until_finish()
    stop.set()
    watcher.join()
    counters = {
        c.key.metric.name: c.committed
        for c in run.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))["counters"]
    }
    assert counters["samples_in"] == N and counters["samples_failed"] == bad
    assert counters["generated_samples"] == N - bad
    quarter = max(1, len(rss) // 4)
    early, late = max(rss[:quarter]), max(rss[-quarter:])
    print(
        f"\nsoak: {N} samples in {time.perf_counter() - start:.1f} s; RSS first quarter max {early:.0f} MB, "
        f"last quarter max {late:.0f} MB, growth {late - early:+.0f} MB, peak {max(rss):.0f} MB"
    )
    # DirectRunner holds whole PCollections in memory between stages; beyond that, nothing may accumulate.
    assert late - early < 400
