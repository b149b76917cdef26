"""Batching: bounded in time in streams (max_batch_duration_secs), ordered by prompt, windows and timestamps kept."""

from __future__ import annotations

from types import SimpleNamespace

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import trigger, window
from helpers import EOC, IMG, run_dofn, same_elements

from beamcap import METRICS_NAMESPACE, CaptionConfig, CaptionImages
from beamcap.batching import BatchByImages, OrderByPrompt, into_calls, prompt_order, split_by_weight
from beamcap.samples import parse, parse_placed

FAST = {"max_new_tokens": 4, "do_sample": False}


def streaming():
    return PipelineOptions(streaming=True)


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ([1, 1, 1, 1, 1], [[1, 1], [1, 1], [1]]),
        ([3, 1, 1], [[3], [1, 1]]),  # heavier than the bound: a batch of its own
        ([1, 2, 1], [[1], [2], [1]]),
        ([], []),
    ],
)
def test_split_by_weight_bounds_each_batch_and_keeps_order(weights, expected):
    items = [SimpleNamespace(weight=w) for w in weights]
    batches = list(split_by_weight(items, 2))
    assert [[item.weight for item in batch] for batch in batches] == expected
    assert [item for batch in batches for item in batch] == items  # nothing lost, order kept


def test_into_calls_never_mixes_prompts_and_bounds_images():
    config = CaptionConfig("beamcap-demo", prompt_key="p", gpu_batch_size=3)
    works = [parse({"id": i, "text": IMG * n, "images": ["x.jpg"] * n, "p": p}, config)
             for i, (n, p) in enumerate([(2, "a"), (1, None), (2, "a"), (1, "b"), (4, None), (1, "a")])]  # fmt: skip
    calls = [[w.sample["id"] for w in call] for call in into_calls(works, 3)]
    assert calls == [[0], [2, 5], [1], [4], [3]]  # prompts in order of first appearance, arrival order inside


def _sample(i, n_images=1):
    return {"id": i, "text": IMG * n_images, "images": [f"{i}.jpg"] * n_images}


def _ids_per_batch(batch):
    return sorted(work.sample["id"] for work in batch)


def test_a_slow_stream_is_batched_within_the_duration():
    """Two samples, max_batch_duration_secs apart in processing time: two batches, not one."""
    stream = (
        TestStream()
        .add_elements([window.TimestampedValue(_sample(0), 1)])
        .advance_processing_time(5)  # longer than max_batch_duration_secs: the first sample goes alone
        .add_elements([window.TimestampedValue(_sample(1), 2)])
        .advance_watermark_to_infinity()
    )
    config = CaptionConfig("beamcap-demo", max_batch_duration_secs=2)
    with TestPipeline(options=streaming()) as p:
        batches = p | stream | BatchByImages(config) | beam.Map(_ids_per_batch)
        assert_that(batches, equal_to([[0], [1]]))


def test_without_time_passing_samples_wait_for_the_end_of_the_stream():
    """The counterpart of the test above: no processing time passes, so both samples share a batch."""
    stream = (
        TestStream()
        .add_elements([window.TimestampedValue(_sample(0), 1)])
        .add_elements([window.TimestampedValue(_sample(1), 2)])
        .advance_watermark_to_infinity()
    )
    config = CaptionConfig("beamcap-demo", max_batch_duration_secs=2)
    with TestPipeline(options=streaming()) as p:
        batches = p | stream | BatchByImages(config) | beam.Map(_ids_per_batch)
        assert_that(batches, equal_to([[0, 1]]))


def _weight_and_places(batch, timestamp=beam.DoFn.TimestampParam):
    # A batch is stamped no later than its earliest sample (the earliest of its pane): that is the watermark
    # hold that keeps downstream windows open while samples wait, on every runner.
    assert timestamp <= min(work.timestamp for work in batch), (timestamp, batch)
    return sum(work.weight for work in batch), [
        (work.sample["id"], float(work.timestamp), float(work.window.start)) for work in batch
    ]


def test_full_batches_go_at_once_and_weigh_at_most_gpu_batch_size_images():
    """gpu_batch_size=2: a batch never holds more than 2 images, whatever the pane size; every sample keeps its
    own timestamp and window inside the batch."""
    config = CaptionConfig("beamcap-demo", gpu_batch_size=2, max_batch_duration_secs=60, streaming_shards=2)
    images = {0: 1, 1: 2, 2: 1, 3: 3, 4: 1, 5: 1, 6: 2}
    stream = (
        TestStream()
        .add_elements([window.TimestampedValue(_sample(i, n), i * 5) for i, n in images.items() if i < 4])
        .advance_watermark_to(20)
        .add_elements([window.TimestampedValue(_sample(i, n), i * 5) for i, n in images.items() if i >= 4])
        .advance_watermark_to_infinity()
    )

    def check(batches):
        places = sorted(place for _, batch_places in batches for place in batch_places)
        assert all(weight <= 2 or len(batch) == 1 for weight, batch in batches), batches
        assert any(weight == 2 for weight, _ in batches), batches  # batches do fill
        assert places == [(i, i * 5.0, 20.0 * (i * 5 // 20)) for i in images], places

    with TestPipeline(options=streaming()) as p:
        batches = (
            p | stream | beam.WindowInto(window.FixedWindows(20)) | BatchByImages(config) | beam.Map(_weight_and_places)
        )
        assert_that(batches, check)


def _kind(element):
    if "sample" in element:
        return "failed"
    return "generated" if element["text"].endswith(EOC) else "original"


def _count_per_window(pcoll, label):
    def keyed(element, w=beam.DoFn.WindowParam):
        return (int(w.start), _kind(element)), 1

    return pcoll | f"Key{label}" >> beam.Map(keyed) | f"Count{label}" >> beam.CombinePerKey(sum)


@pytest.mark.parametrize("shards", [1, 3])
def test_windows_closing_while_samples_wait_lose_nothing_downstream(blip_dir, image_dir, shards):
    """Samples still waiting for their batch when the watermark passes their window's end reach the
    per-window aggregation after it: every window's counts are exact, failures included."""

    def at(i, ts, image="red.jpg"):
        return window.TimestampedValue({"id": i, "text": IMG, "images": [str(image_dir / image)]}, ts)

    stream = (
        TestStream()
        .add_elements([at(0, 1), at(1, 5), at(2, 9, "missing.jpg")])
        .advance_watermark_to(20)  # window [0, 20) ends while its samples wait (no processing time has passed) ...
        .add_elements([at(3, 21), at(4, 33)])
        .advance_watermark_to(40)  # ... and so does [20, 40): the output watermark is held at the earliest, 1
        .add_elements([at(5, 45, "missing.jpg")])
        .advance_processing_time(10)
        .add_elements([at(6, 47)])
        .advance_watermark_to_infinity()
    )
    expected = [
        ((0, "original"), 2), ((0, "generated"), 2), ((0, "failed"), 1),
        ((20, "original"), 2), ((20, "generated"), 2),
        ((40, "original"), 1), ((40, "generated"), 1), ((40, "failed"), 1),
    ]  # fmt: skip
    transform = CaptionImages(
        blip_dir, gpu_batch_size=8, max_batch_duration_secs=5, streaming_shards=shards, **FAST
    ).with_exception_handling()
    with TestPipeline(options=streaming()) as p:
        result = p | stream | beam.WindowInto(window.FixedWindows(20)) | transform
        counts = (
            _count_per_window(result.good, "Good"),
            _count_per_window(result.failed, "Failed"),
        ) | beam.Flatten()
        assert_that(counts, equal_to(expected))


def test_outputs_get_the_input_windowing_back(blip_dir):
    """Downstream transforms see the caller's windowing (window fn, trigger, lateness), not the batcher's."""
    fixed = window.FixedWindows(20)
    p = TestPipeline(options=streaming())  # built, not run: windowing is a property of the graph
    samples = (
        p
        | TestStream().add_elements([_sample(0)]).advance_watermark_to_infinity()
        | beam.WindowInto(
            fixed,
            trigger=trigger.AfterWatermark(late=trigger.AfterCount(1)),
            accumulation_mode=trigger.AccumulationMode.ACCUMULATING,
            allowed_lateness=30,
        )
    )
    result = samples | CaptionImages(blip_dir, max_batch_duration_secs=1, **FAST).with_exception_handling()
    batches = samples | "Batches" >> BatchByImages(CaptionConfig(blip_dir, max_batch_duration_secs=1))
    assert batches.windowing.windowfn != fixed  # the batcher regroups under its own windowing ...
    for pcoll in result:  # ... and the outputs get the caller's back
        assert pcoll.windowing.windowfn == fixed
        assert pcoll.windowing.triggerfn == samples.windowing.triggerfn
        assert pcoll.windowing.allowed_lateness == samples.windowing.allowed_lateness
        assert pcoll.windowing.accumulation_mode == samples.windowing.accumulation_mode


def test_bounded_input_with_a_duration_is_batched_as_usual(blip_dir, image_dir):
    """max_batch_duration_secs bounds waiting in a stream; on bounded input the batch path runs, same output."""
    samples = [{"id": i, "text": IMG, "images": [str(image_dir / c)]} for i, c in enumerate(["red.jpg", "blue.png"])]
    expected = run_dofn(CaptionConfig(blip_dir, **FAST), samples)
    with TestPipeline() as p:
        out = p | beam.Create(samples) | CaptionImages(blip_dir, gpu_batch_size=2, max_batch_duration_secs=1, **FAST)
        assert_that(out, same_elements(expected["generated"] + expected["original"]))


def _prompted(i, prompt):
    return {"id": i, "text": IMG, "images": [f"{i}.jpg"], "p": prompt}


def test_prompt_order_groups_prompts_and_keeps_arrival_order_within_one():
    config = CaptionConfig("beamcap-demo", prompt="default", prompt_key="p")
    samples = [_prompted(i, p) for i, p in enumerate(["b", "a", None, "b", 7, "a"])] + ["not a dict"]
    works = [parse(sample, config) for sample in samples]
    ordered = [w.sample if isinstance(w.sample, str) else w.sample["id"] for w in sorted(works, key=prompt_order)]
    assert ordered == ["not a dict", 1, 5, 0, 3, 2, 4]  # failing samples first, then a, b, default (None and 7)


def test_batches_of_mixed_prompts_fill_generate_calls(blip_dir, image_dir):
    """16 samples alternating between two prompts, 4 images per call: batches in arrival order would give 8 calls
    of 2 (prompts are never mixed in a call); ordered by prompt they give 4 full calls. Outputs are the same."""
    img = str(image_dir / "red.jpg")
    samples = [{"id": i, "text": IMG, "images": [img], "p": ["a photo of", "a picture of"][i % 2]} for i in range(16)]
    config = dict(prompt_key="p", gpu_batch_size=4, min_batch_size=4, **FAST)
    expected = run_dofn(CaptionConfig(blip_dir, **config), samples)
    p = TestPipeline()
    out = p | beam.Create(samples, reshuffle=False) | CaptionImages(blip_dir, **config)
    assert_that(out, same_elements(expected["generated"] + expected["original"]))
    result = p.run()
    result.wait_until_finish()
    query = MetricsFilter().with_namespace(METRICS_NAMESPACE).with_name("generate_batch_size")
    sizes = result.metrics().query(query)["distributions"][0].committed
    assert (sizes.count, sizes.sum, sizes.min, sizes.max) == (4, 16, 4, 4)


def test_order_by_prompt_emits_everything_in_its_own_window(image_dir):
    """The reorder buffer flushes when full and at the end of the bundle; each sample stays in its window."""
    config = CaptionConfig("beamcap-demo", prompt_key="p")
    samples = [window.TimestampedValue(_prompted(i, "ab"[i % 2]), i * 10) for i in range(7)]
    with TestPipeline() as p:
        out = (
            p
            | beam.Create(samples, reshuffle=False)
            | beam.WindowInto(window.FixedWindows(20))
            | beam.Map(parse_placed, config)
            | beam.ParDo(OrderByPrompt(buffer_size=3))
            | beam.Map(lambda work, w=beam.DoFn.WindowParam: (work.sample["id"], float(work.timestamp), float(w.start)))
        )
        assert_that(out, equal_to([(i, i * 10.0, 20.0 * (i // 2)) for i in range(7)]))


def test_session_windows_merge_downstream_as_without_the_batcher(blip_dir, image_dir):
    """Merging windows: each sample goes back to its own proto-session, so a downstream per-session count merges
    them exactly as it would have without captioning in between."""

    def at(i, ts):
        return window.TimestampedValue({"id": i, "text": IMG, "images": [str(image_dir / "red.jpg")]}, ts)

    stream = (
        TestStream()
        .add_elements([at(0, 1), at(1, 5), at(2, 30)])
        .advance_watermark_to(25)  # the session [1, 15) ends while its samples wait
        .add_elements([at(3, 36)])
        .advance_watermark_to_infinity()
    )
    transform = CaptionImages(blip_dir, gpu_batch_size=8, max_batch_duration_secs=5, keep_original_sample=False, **FAST)
    with TestPipeline(options=streaming()) as p:
        generated = p | stream | beam.WindowInto(window.Sessions(10)) | transform
        counts = (
            generated
            | beam.Map(lambda sample: ("generated", 1))
            | beam.CombinePerKey(sum)
            | beam.Map(lambda kv, w=beam.DoFn.WindowParam: (float(w.start), float(w.end), kv[1]))
        )
        assert_that(counts, equal_to([(1.0, 15.0, 2), (30.0, 46.0, 2)]))
