"""prefetch_images: a batch's images are read in the background while the previous batch generates."""

from __future__ import annotations

import threading

import apache_beam as beam
import pytest
from apache_beam.pvalue import TaggedOutput
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that
from apache_beam.transforms import window
from helpers import IMG, run_dofn, same_elements

from beamcap import CaptionConfig, CaptionImages
from beamcap.dofn import CaptionDoFn, with_placement

FAST = {"max_new_tokens": 4, "do_sample": False}


def _samples(image_dir):
    colours = ["red.jpg", "blue.png", "missing.jpg", "green.jpg", "yellow.png", "red.png", "blue.jpg"]
    return [{"id": i, "text": IMG, "images": [str(image_dir / c)]} for i, c in enumerate(colours)] + ["not a dict"]


def test_prefetching_gives_the_same_outputs_and_failures(blip_dir, image_dir):
    samples = _samples(image_dir)
    expected = run_dofn(CaptionConfig(blip_dir, **FAST), samples)
    with TestPipeline() as p:
        result = (
            p
            | beam.Create(samples, reshuffle=False)
            | CaptionImages(
                blip_dir, gpu_batch_size=2, min_batch_size=2, prefetch_images=True, **FAST
            ).with_exception_handling()
        )
        assert_that(result.good, same_elements(expected["generated"] + expected["original"]), label="Good")
        assert_that(result.failed, same_elements(expected["failed"]), label="Failed")


def test_a_batch_is_read_off_the_main_thread_while_the_previous_one_generates(blip_dir, image_dir):
    """process(batch k) starts reading batch k in the background and emits batch k-1; finish_bundle emits the last.
    Every output keeps its own timestamp and window."""
    config = CaptionConfig(blip_dir, prefetch_images=True, **FAST)
    dofn = CaptionDoFn(config, handle_failures=True)
    dofn.setup()
    readers = []
    read = dofn._read

    def recording(batch):  # records the thread; the real read runs
        readers.append(threading.current_thread().name)
        return read(batch)

    dofn._read = recording
    w = window.IntervalWindow(0, 100)
    samples = _samples(image_dir)[:4]
    placed = [with_placement(s, timestamp=i * 10, window=w, pane=None) for i, s in enumerate(samples)]
    dofn.start_bundle()
    first = list(dofn.process(placed[:2]))
    second = list(dofn.process(placed[2:]))
    last = list(dofn.finish_bundle())
    dofn.teardown()

    def placed_samples(outputs):  # (windowed value, its sample) per output, failure records unwrapped
        values = [o.value if isinstance(o, TaggedOutput) else o for o in outputs]
        return [(v, v.value["sample"] if "error" in v.value else v.value) for v in values]

    def ids(outputs):
        return sorted({sample["id"] for _, sample in placed_samples(outputs)})

    assert first == []
    assert ids(second) == [0, 1] and ids(last) == [2, 3]  # sample 2 (missing file) fails, in its turn
    assert readers and all(name.startswith("beamcap-read") for name in readers)
    for value, sample in placed_samples(second + last):
        assert (value.timestamp, tuple(value.windows)) == (sample["id"] * 10, (w,))


def test_without_exception_handling_a_prefetched_failure_fails_the_job(blip_dir, image_dir):
    samples = _samples(image_dir)[:4]
    with pytest.raises(Exception, match="file not found"):
        with TestPipeline() as p:
            _ = (
                p
                | beam.Create(samples, reshuffle=False)
                | CaptionImages(blip_dir, gpu_batch_size=2, min_batch_size=2, prefetch_images=True, **FAST)
            )
