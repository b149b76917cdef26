"""Batching samples for generation, weighed in images.

Each sample is paired with its timestamp first (batching would replace it),
then Beam's adaptive ``BatchElements`` groups the pairs so that one batch
holds at most ``max_batch_size`` (default ``gpu_batch_size``) images: a sample
with three image tokens weighs three.
"""

from __future__ import annotations

import functools

import apache_beam as beam

from beamcap.config import CaptionConfig
from beamcap.dofn import image_weight, with_timestamp


class BatchByImages(beam.PTransform):
    """Samples -> lists of (sample, timestamp) pairs, weighed in images."""

    def __init__(self, config: CaptionConfig):
        super().__init__()
        self._config = config

    def expand(self, samples):
        config = self._config
        min_size, max_size = config.batch_bounds
        weight = functools.partial(
            image_weight, text_key=config.text_key, image_key=config.image_key, image_token=config.image_token
        )
        return (
            samples
            | "KeepTimestamps" >> beam.Map(with_timestamp)
            | "BatchElements"
            >> beam.BatchElements(min_batch_size=min_size, max_batch_size=max_size, element_size_fn=weight)
        )
