"""Batching samples for generation, weighed in images.

Each sample is paired with its timestamp, window and pane first (batching
would replace them), then grouped so that one batch holds at most
``max_batch_size`` (default ``gpu_batch_size``) images: a sample with three
image tokens weighs three.

- Bounded input, or no ``max_batch_duration_secs``: Beam's adaptive
  ``BatchElements`` (batches per bundle and window).
- A streaming pipeline with ``max_batch_duration_secs``: a keyed
  ``GroupByKey`` in the global window whose trigger fires when
  ``max_batch_size`` samples are waiting or ``max_batch_duration_secs`` after
  the first of them arrived, and at the end of the stream. Its output
  timestamp is the earliest waiting sample's, so the watermark is held while
  samples wait: a window of the caller's downstream aggregation cannot close
  before its samples are captioned (nothing arrives late, nothing is dropped).
  The caller restores the input's windowing on the captioned outputs.

Beam's own ``BatchElements(max_batch_duration_secs=...)`` is not used: on the
Python DirectRunner its final buffered element reached a downstream combine
after the window had closed, and was dropped (ENGINES.md).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterable, Iterator

import apache_beam as beam
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.transforms import trigger, window
from apache_beam.transforms.core import Windowing

from beamcap.config import CaptionConfig
from beamcap.dofn import Placed, image_weight, with_placement


def split_by_weight(
    items: Iterable[Placed], max_weight: int, weight: Callable[[Placed], int]
) -> Iterator[list[Placed]]:
    """Consecutive batches of at most ``max_weight`` (a heavier item is a batch of its own); none empty."""
    batch: list[Placed] = []
    total = 0
    for item in items:
        w = weight(item)
        if batch and total + w > max_weight:
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += w
    if batch:
        yield batch


def uses_stream_batcher(config: CaptionConfig, samples: beam.PCollection) -> bool:
    """Whether ``samples`` are batched by the streaming batcher, under its own windowing.

    True when ``max_batch_duration_secs`` is set and ``samples`` are unbounded
    or the pipeline runs in streaming mode.
    """
    streaming = not samples.is_bounded or samples.pipeline.options.view_as(StandardOptions).streaming
    return config.max_batch_duration_secs is not None and streaming


def batch_windowing(max_samples: int, max_duration_secs: float) -> Windowing:
    """The windowing the streaming batcher's GroupByKey runs under (see the module docstring)."""
    return Windowing(
        window.GlobalWindows(),
        triggerfn=trigger.AfterWatermark(
            early=trigger.AfterAny(trigger.AfterCount(max_samples), trigger.AfterProcessingTime(max_duration_secs))
        ),
        accumulation_mode=trigger.AccumulationMode.DISCARDING,
        timestamp_combiner=window.TimestampCombiner.OUTPUT_AT_EARLIEST,
    )


def _with_shard(item: Placed, shards: int) -> tuple[int, Placed]:
    return random.randrange(shards), item


class BatchByImages(beam.PTransform):
    """Samples -> lists of placed samples (:data:`beamcap.dofn.Placed`), weighed in images."""

    def __init__(self, config: CaptionConfig):
        super().__init__()
        self._config = config

    def expand(self, samples):
        config = self._config
        min_size, max_size = config.batch_bounds
        weight = functools.partial(
            image_weight, text_key=config.text_key, image_key=config.image_key, image_token=config.image_token
        )
        placed = samples | "KeepPlacement" >> beam.Map(with_placement)
        if not uses_stream_batcher(config, samples):
            return placed | "BatchElements" >> beam.BatchElements(
                min_batch_size=min_size, max_batch_size=max_size, element_size_fn=weight
            )
        keyed = placed | "AssignShard" >> beam.Map(_with_shard, config.streaming_shards)
        keyed._windowing = batch_windowing(max_size, config.max_batch_duration_secs)  # as Beam's Reshuffle does
        return (
            keyed
            | "WaitForBatch" >> beam.GroupByKey()
            | "SplitByImages" >> beam.FlatMap(lambda kv: split_by_weight(kv[1], max_size, weight))
        )


def restore_windowing(outputs: Iterable[beam.PCollection], windowing: Windowing) -> None:
    """Give outputs of the streaming batcher the windowing of the transform's input.

    Every output element already carries its sample's own window and
    timestamp; this restores the strategy (trigger, lateness) downstream
    transforms see, as Beam's ``Reshuffle`` does.
    """
    for pcoll in outputs:
        pcoll._windowing = windowing
