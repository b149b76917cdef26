"""The job's metrics (Beam counters and distributions under one namespace) and its progress log line."""

from __future__ import annotations

import logging
import time
from typing import Any

from apache_beam.metrics import Metrics

_LOGGER = logging.getLogger(__name__)

METRICS_NAMESPACE = "beamcap"
PROGRESS_EVERY_SECS = 30.0
LOADS_IN = "model_loads_in_"
"""Prefix of the counters of model loads per dtype (``model_loads_in_float32``, ...)."""


class CaptionMetrics:
    """Counters: samples_in, samples_failed, images_captioned, captions_generated, generated_samples,
    original_samples, model_loads (and model_loads_in_<dtype>). Distributions: model_load_ms, generate_latency_ms,
    generate_batch_size."""

    def __init__(self):
        ns = METRICS_NAMESPACE
        self.samples_in = Metrics.counter(ns, "samples_in")
        self.samples_failed = Metrics.counter(ns, "samples_failed")
        self.images_captioned = Metrics.counter(ns, "images_captioned")
        self.captions_generated = Metrics.counter(ns, "captions_generated")
        self.generated_samples = Metrics.counter(ns, "generated_samples")
        self.original_samples = Metrics.counter(ns, "original_samples")
        self.model_loads = Metrics.counter(ns, "model_loads")
        self.model_load_ms = Metrics.distribution(ns, "model_load_ms")
        self.generate_latency_ms = Metrics.distribution(ns, "generate_latency_ms")
        self.generate_batch_size = Metrics.distribution(ns, "generate_batch_size")
        self._progress: dict[str, float] | None = None

    def model_loaded(self, info: dict[str, Any]) -> None:
        self.model_loads.inc()
        self.model_load_ms.update(int(info["load_secs"] * 1000))
        # Which dtype ran, as a counter of its own (Beam metrics are numbers): the job's summary reads it back.
        Metrics.counter(METRICS_NAMESPACE, f"{LOADS_IN}{info['dtype']}").inc()

    def generated(self, images: int, seconds: float) -> None:
        self.generate_latency_ms.update(int(seconds * 1000))
        self.generate_batch_size.update(images)

    def progress(self, samples: int, images: int, failed: int) -> None:
        """Count a processed call; every PROGRESS_EVERY_SECS, log a progress line for this DoFn instance."""
        now = time.monotonic()
        if self._progress is None:
            self._progress = {"samples": 0, "images": 0, "failed": 0, "started": now, "logged": now}
        p = self._progress
        p["samples"] += samples
        p["images"] += images
        p["failed"] += failed
        if now - p["logged"] >= PROGRESS_EVERY_SECS:
            p["logged"] = now
            _LOGGER.info(
                "beamcap progress: %d samples, %d images captioned (%.2f images/s), %d failed",
                p["samples"],
                p["images"],
                p["images"] / max(now - p["started"], 1e-9),
                p["failed"],
            )
