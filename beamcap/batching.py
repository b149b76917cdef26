"""Batching parsed samples into ``generate`` calls.

One concept: what leaves this stage is one ``generate`` call's samples, all
with one prompt and at most ``gpu_batch_size`` images (a sample with three
image tokens weighs three; a single sample with more images than that is a
call of its own, which the DoFn captions in parts). Two steps get there:

1. Gather: samples are gathered into batches of ``min_batch_size`` to
   ``max_batch_size`` images (default ``gpu_batch_size``).

   - Bounded input, or no ``max_batch_duration_secs``: Beam's adaptive
     ``BatchElements`` (batches per bundle and window).
   - A streaming pipeline with ``max_batch_duration_secs``: a keyed
     ``GroupByKey`` in the global window whose trigger fires when
     ``max_batch_size`` samples are waiting or ``max_batch_duration_secs``
     after the first of them arrived, and at the end of the stream. Its output
     timestamp is the earliest waiting sample's, so the watermark is held while
     samples wait: a window of the caller's downstream aggregation cannot close
     before its samples are captioned (nothing arrives late, nothing is
     dropped). The caller restores the input's windowing on the outputs
     (:func:`restore_windowing`).

2. Cut: each gathered batch is cut into calls of one prompt (prompts are never
   mixed in a call, so no call pads a prompt) and at most ``gpu_batch_size``
   images.

With ``prompt_key`` set in batch mode, samples are ordered by prompt before
they are gathered (a bounded buffer per bundle), so that a batch mostly holds
one prompt and its calls are full (the streaming batcher's panes are cut by
prompt whole).

Beam's own ``BatchElements(max_batch_duration_secs=...)`` is not used: its
stateful DoFn does not hold the watermark while it buffers, so on the Python
DirectRunner a buffered element reached a downstream combine after its window
had closed, counted in a late second pane (tests/test_batching.py fails with
it).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator

import apache_beam as beam
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.transforms import trigger, window
from apache_beam.transforms.core import Windowing

from beamcap.config import CaptionConfig
from beamcap.samples import Work, parse_placed, placed

PROMPT_BUFFER_BATCHES = 16
"""With ``prompt_key`` (batch mode), samples are reordered by prompt in runs of ``16 * max_batch_size`` samples."""


def split_by_weight(works: Iterable[Work], max_weight: int) -> Iterator[list[Work]]:
    """Consecutive runs of at most ``max_weight`` images (a heavier sample is a run of its own); none empty."""
    run: list[Work] = []
    total = 0
    for work in works:
        if run and total + work.weight > max_weight:
            yield run
            run, total = [], 0
        run.append(work)
        total += work.weight
    if run:
        yield run


def into_calls(batch: Iterable[Work], gpu_batch_size: int) -> Iterator[list[Work]]:
    """A gathered batch as ``generate`` calls: one prompt each (prompts in order of first appearance, samples in
    arrival order), at most ``gpu_batch_size`` images each."""
    by_prompt: dict[str | None, list[Work]] = {}
    for work in batch:
        by_prompt.setdefault(work.prompt, []).append(work)
    for works in by_prompt.values():
        yield from split_by_weight(works, gpu_batch_size)


def prompt_order(work: Work) -> str:
    """Sort key grouping samples by prompt (samples without one, failed ones included, sort first)."""
    return "" if work.prompt is None else "\0" + work.prompt


class OrderByPrompt(beam.DoFn):
    """Reorders samples so that samples with the same prompt arrive together.

    Holds at most ``buffer_size`` samples; when full (and at the end of the
    bundle) it emits them grouped by prompt, each in its own window and at its
    own timestamp.
    """

    def __init__(self, buffer_size: int):
        self._buffer_size = buffer_size

    def start_bundle(self) -> None:
        self._buffer: list[Work] = []

    def process(self, work: Work) -> Iterator:
        self._buffer.append(work)
        if len(self._buffer) >= self._buffer_size:
            yield from self._flush()

    def finish_bundle(self) -> Iterator:
        yield from self._flush()

    def _flush(self) -> Iterator:
        works, self._buffer = sorted(self._buffer, key=prompt_order), []
        for work in works:
            yield placed(work, work)


def uses_stream_batcher(config: CaptionConfig, samples: beam.PCollection) -> bool:
    """Whether ``samples`` are gathered by the streaming batcher, under its own windowing.

    True when ``max_batch_duration_secs`` is set and ``samples`` are unbounded
    or the pipeline runs in streaming mode.
    """
    streaming = not samples.is_bounded or samples.pipeline.options.view_as(StandardOptions).streaming
    return config.max_batch_duration_secs is not None and streaming


def _weight(work: Work) -> int:
    return work.weight


def _with_shard(work: Work, shards: int) -> tuple[int, Work]:
    return random.randrange(shards), work


class BatchByImages(beam.PTransform):
    """Samples -> ``generate`` calls: lists of parsed samples (:class:`~beamcap.samples.Work`) with one prompt
    and at most ``gpu_batch_size`` images."""

    def __init__(self, config: CaptionConfig):
        super().__init__()
        self._config = config

    def expand(self, samples):
        config = self._config
        min_size, max_size = config.batch_bounds
        works = samples | "Parse" >> beam.Map(parse_placed, config)
        if not uses_stream_batcher(config, samples):
            if config.prompt_key is not None:
                works = works | "OrderByPrompt" >> beam.ParDo(OrderByPrompt(PROMPT_BUFFER_BATCHES * max_size))
            batches = works | "Gather" >> beam.BatchElements(
                min_batch_size=min_size, max_batch_size=max_size, element_size_fn=_weight
            )
        else:
            batches = (
                works
                | "AssignShard" >> beam.Map(_with_shard, config.streaming_shards)
                | "WaitInGlobalWindow"
                >> beam.WindowInto(
                    window.GlobalWindows(),
                    trigger=trigger.AfterWatermark(
                        early=trigger.AfterAny(
                            trigger.AfterCount(max_size), trigger.AfterProcessingTime(config.max_batch_duration_secs)
                        )
                    ),
                    accumulation_mode=trigger.AccumulationMode.DISCARDING,
                    timestamp_combiner=window.TimestampCombiner.OUTPUT_AT_EARLIEST,
                )
                | "Gather" >> beam.GroupByKey()
                | "Batches" >> beam.Values()
            )
        return batches | "IntoCalls" >> beam.FlatMap(into_calls, config.gpu_batch_size)


def restore_windowing(outputs: Iterable[beam.PCollection], windowing: Windowing) -> None:
    """Give the outputs of the streaming batcher the windowing strategy of the transform's input.

    Every output element is already in its sample's own window, at its own timestamp (:func:`placed`); this
    restores the strategy (window fn, trigger, lateness) that downstream transforms see. Nothing public sets a
    PCollection's strategy without re-assigning its elements' windows, so this does what Beam's ``Reshuffle``
    does; tests/test_batching.py fails if Beam changes that.
    """
    for pcoll in outputs:
        pcoll._windowing = windowing
