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

With ``prompt_key`` set, samples are ordered by prompt before they are cut
into batches (a bounded buffer per bundle in batch mode; each pane in
streaming), so that a batch mostly holds one prompt. A batch is split into one
``generate`` call per prompt (SPEC: prompts are never mixed), so arrival order
would otherwise give several small calls per batch.

Beam's own ``BatchElements(max_batch_duration_secs=...)`` is not used: its
stateful DoFn does not hold the watermark while it buffers, so on the Python
DirectRunner a buffered element reached a downstream combine after its window
had closed: dropped (ENGINES.md), or counted in a late second pane
(tests/test_batching.py fails with it).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterable, Iterator

import apache_beam as beam
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.transforms import trigger, window
from apache_beam.transforms.core import Windowing
from apache_beam.utils.windowed_value import WindowedValue

from beamcap.config import CaptionConfig
from beamcap.dofn import Placed, image_weight, with_placement

PROMPT_BUFFER_BATCHES = 16
"""With ``prompt_key`` (batch mode), samples are reordered by prompt in runs of ``16 * max_batch_size`` samples."""


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


def prompt_order(config: CaptionConfig) -> Callable[[Placed], str]:
    """Sort key grouping placed samples by their prompt (non-dict samples, which fail later, sort first)."""

    def key(item: Placed) -> str:
        sample = item[0]
        prompt = config.prompt_for(sample) if isinstance(sample, dict) else None
        return "" if prompt is None else "\0" + prompt

    return key


class OrderByPrompt(beam.DoFn):
    """Reorders placed samples so that samples with the same prompt arrive together.

    Holds at most ``buffer_size`` samples; when full (and at the end of the
    bundle) it emits them grouped by prompt, each in its own window and at its
    own timestamp.
    """

    def __init__(self, config: CaptionConfig, buffer_size: int):
        self._key = prompt_order(config)
        self._buffer_size = buffer_size

    def start_bundle(self) -> None:
        self._buffer: list[Placed] = []

    def process(self, item: Placed) -> Iterator[WindowedValue]:
        self._buffer.append(item)
        if len(self._buffer) >= self._buffer_size:
            yield from self._flush()

    def finish_bundle(self) -> Iterator[WindowedValue]:
        yield from self._flush()

    def _flush(self) -> Iterator[WindowedValue]:
        items, self._buffer = sorted(self._buffer, key=self._key), []
        for item in items:
            yield item[1].with_value(item)


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
        weight = functools.partial(image_weight, config=config)
        placed = samples | "KeepPlacement" >> beam.Map(with_placement)
        if not uses_stream_batcher(config, samples):
            if config.prompt_key is not None:
                placed = placed | "OrderByPrompt" >> beam.ParDo(OrderByPrompt(config, PROMPT_BUFFER_BATCHES * max_size))
            return placed | "BatchElements" >> beam.BatchElements(
                min_batch_size=min_size, max_batch_size=max_size, element_size_fn=weight
            )
        order = prompt_order(config)
        keyed = placed | "AssignShard" >> beam.Map(_with_shard, config.streaming_shards)
        keyed._windowing = batch_windowing(max_size, config.max_batch_duration_secs)  # as Beam's Reshuffle does
        return (
            keyed
            | "WaitForBatch" >> beam.GroupByKey()
            | "SplitByImages" >> beam.FlatMap(lambda kv: split_by_weight(sorted(kv[1], key=order), max_size, weight))
        )


def restore_windowing(outputs: Iterable[beam.PCollection], windowing: Windowing) -> None:
    """Give outputs of the streaming batcher the windowing of the transform's input.

    Every output element already carries its sample's own window and
    timestamp; this restores the strategy (trigger, lateness) downstream
    transforms see, as Beam's ``Reshuffle`` does.
    """
    for pcoll in outputs:
        pcoll._windowing = windowing
