"""The captioning DoFn: one ``generate`` call's samples in, tagged original / generated / failed samples out.

It orchestrates the stages and does none of them itself: the samples arrive
parsed and grouped into one call (:mod:`beamcap.samples`,
:mod:`beamcap.batching`); ``setup()`` gets the model (:mod:`beamcap.lifecycle`);
``process()`` reads the images, runs the call isolating each image
(:mod:`beamcap.isolation`), and emits what each sample becomes
(:mod:`beamcap.outputs`), in the sample's own timestamp, window and pane.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator, Sequence

import apache_beam as beam
from apache_beam.pvalue import TaggedOutput

from beamcap.config import CaptionConfig
from beamcap.images import describe_ref
from beamcap.isolation import call_isolating
from beamcap.lifecycle import ModelLifecycle
from beamcap.metrics import CaptionMetrics
from beamcap.outputs import failure_record, generated_samples
from beamcap.samples import SampleError, Work, load_images, placed
from beamcap.seeding import derive_seed

_LOGGER = logging.getLogger(__name__)

ORIGINAL = "original"
GENERATED = "generated"
FAILED = "failed"


class CaptionDoFn(beam.DoFn):
    """Captions one ``generate`` call's samples (a list of :class:`~beamcap.samples.Work`) per element.

    Outputs: generated samples on the main output (tag ``generated`` in
    ``with_outputs(..., main=GENERATED)``), input samples that were processed
    on ``original``, and failure records on ``failed``.
    """

    def __init__(self, config: CaptionConfig, handle_failures: bool = False, lifecycle: ModelLifecycle | None = None):
        """``lifecycle``: where the model comes from; DoFns given the same one share their model (default: a
        lifecycle of their own)."""
        self._config = config
        self._handle_failures = handle_failures
        self._lifecycle = lifecycle or ModelLifecycle(config)
        self._metrics = CaptionMetrics()
        self._models = None
        self._loads_reported = False

    def setup(self) -> None:
        self._models = self._lifecycle.acquire()
        self._settings = self._config.generation_settings()
        self._draft_size = self._models.info["input_size"]

    def process(self, call: Sequence[Work]) -> Iterator:
        if not self._loads_reported:  # metrics updated in setup() are not reported: count loads here
            self._loads_reported = True
            for info in self._models.claim_load_reports():
                self._metrics.model_loaded(info)
        self._metrics.samples_in.inc(len(call))
        self._caption(call)
        yield from self._emit(call)

    def _caption(self, call: Sequence[Work]) -> None:
        """One ``generate`` call for the images of ``call`` (all with one prompt); a failed call is retried in
        halves, so only the images at fault fail. A single sample with more than ``gpu_batch_size`` images is
        captioned in calls of ``gpu_batch_size``. Images are read and decoded call by call and dropped after it,
        so at most ``gpu_batch_size`` decoded images are held, however many a sample names.

        An image that runs out of memory alone is not the sample's fault but the device's: it fails the bundle,
        loudly, as a model that cannot load does.
        """
        from beamcap.devices import free_device_memory, is_out_of_memory, memory_that_ran_out
        from beamcap.model import PromptTooLongError

        captioner = self._models.next()
        jobs = [(work, index) for work in call if work.needs_captions for index in work.plan.image_indices]
        if len({work.prompt for work, _ in jobs}) > 1:
            raise ValueError("one call's samples must share one prompt: batch them with beamcap.batching.into_calls")
        size, pending = self._config.gpu_batch_size, iter(jobs)
        while chunk := self._next_chunk(pending, size):
            outcomes = call_isolating(
                lambda part: self._generate(captioner, part),
                chunk,
                is_oom=is_out_of_memory,
                on_oom=free_device_memory,
                splits=lambda error: not isinstance(error, PromptTooLongError),
            )
            for (work, index), outcome in zip(chunk, outcomes, strict=True):
                ref = describe_ref(work.sample[self._config.image_key][index])
                where = f"image {ref} ({self._config.image_key}[{index}])"
                if not isinstance(outcome, Exception):
                    work.candidates[index] = outcome
                elif is_out_of_memory(outcome):
                    memory = memory_that_ran_out(outcome, captioner.info()["device"])
                    raise RuntimeError(
                        f"{where}: out of memory on {memory} with this one image alone, so no smaller call can "
                        "caption it: use a device with more memory, a smaller torch_dtype, or max_input_pixels to "
                        "bound the image's size"
                    ) from outcome
                elif work.error is None:
                    work.error = f"{where}: captioning failed: {type(outcome).__name__}: {outcome}"
            for work, index in chunk:
                work.images.pop(index, None)

    def _next_chunk(self, pending: Iterator[tuple[Work, int]], size: int) -> list[tuple[Work, int]]:
        """The next ``size`` jobs (fewer at the end) whose images are decoded; jobs of failed samples are skipped."""
        chunk: list[tuple[Work, int]] = []
        while len(chunk) < size and (taken := list(itertools.islice(pending, size - len(chunk)))):
            chunk += self._load(taken)
        return [(work, index) for work, index in chunk if work.error is None]  # a later image may have failed it

    def _load(self, jobs: Sequence[tuple[Work, int]]) -> list[tuple[Work, int]]:
        """Decode the images of ``jobs`` (a sample that failed earlier is skipped); the jobs whose image is in."""
        indices: dict[int, tuple[Work, list[int]]] = {}
        for work, index in jobs:
            indices.setdefault(id(work), (work, []))[1].append(index)
        for work, wanted in indices.values():
            if work.error is None:
                load_images(work, self._config, self._draft_size, wanted)
        return [(work, index) for work, index in jobs if work.error is None and index in work.images]

    def _generate(self, captioner, jobs: Sequence[tuple[Work, int]]) -> list[list[str]]:
        seeds = None
        if self._config.seed is not None:  # one per image, a function of (seed, sample, image index)
            seeds = [derive_seed(self._config.seed, "generate", work.key, index) for work, index in jobs]
        start = time.perf_counter()
        captions = captioner.caption([w.images[i] for w, i in jobs], jobs[0][0].prompt, self._settings, seeds)
        self._metrics.generated(len(jobs), time.perf_counter() - start)
        return captions

    def _emit(self, call: Sequence[Work]) -> Iterator:
        config, metrics = self._config, self._metrics
        images = failed = 0
        for work in call:
            generated = []
            if work.error is None and work.plan is not None:
                try:  # the last part of the sample's isolation boundary: its generated copies
                    generated = generated_samples(work, config)
                except Exception as e:  # noqa: BLE001 - a sample that cannot be copied or rendered fails alone
                    work.error = f"cannot make the generated samples: {type(e).__name__}: {e}"
            if work.error is not None:
                failed += 1
                metrics.samples_failed.inc()
                if not self._handle_failures:
                    raise SampleError(
                        f"{work.error}. Use CaptionImages(...).with_exception_handling() to route failed "
                        "samples to a separate output instead of failing the job."
                    )
                _LOGGER.warning("Sample failed: %s", work.error)
                yield TaggedOutput(FAILED, placed(failure_record(work.sample, work.error), work))
                continue
            yield TaggedOutput(ORIGINAL, placed(work.sample, work))
            if config.keep_original_sample:
                metrics.original_samples.inc()
            if work.plan is None:
                continue
            n_images = len(work.plan.image_indices)
            images += n_images
            metrics.images_captioned.inc(n_images)
            metrics.captions_generated.inc(n_images * config.caption_num)
            for sample in generated:
                metrics.generated_samples.inc()
                yield placed(sample, work)  # the main output
        metrics.progress(len(call), images, failed)
