"""The captioning DoFn: one batch of samples in, tagged original / generated / failed samples out.

``setup()`` gets the model shared by every thread of the worker process.
``process()`` isolates each sample: a sample that cannot be read or captioned
is reported with a reason, and the rest of its batch is captioned normally.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import random
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput
from apache_beam.utils import shared
from apache_beam.utils.windowed_value import WindowedValue
from PIL import Image

from beamcap.config import CaptionConfig
from beamcap.dj_format import TextPlan, plan_text, render_text
from beamcap.images import ImageLoadError, describe_ref, fit_pixels, load_image
from beamcap.isolation import call_isolating
from beamcap.retention import KeepMode, choose_captions, sample_rng
from beamcap.seeding import derive_seed

_LOGGER = logging.getLogger(__name__)

METRICS_NAMESPACE = "beamcap"
PROGRESS_EVERY_SECS = 30.0
ORIGINAL = "original"
GENERATED = "generated"
FAILED = "failed"


class SampleError(Exception):
    """A sample that cannot be captioned (raised when failures are not handled)."""


def failure_record(sample: Any, reason: str) -> dict[str, Any]:
    """What the failed output holds for one sample."""
    return {"sample": sample, "error": reason}


@dataclass
class _Work:
    """One sample on its way through a batch."""

    sample: Any
    plan: TextPlan | None = None
    prompt: str | None = None
    images: dict[int, Image.Image] = field(default_factory=dict)
    candidates: dict[int, list[str]] = field(default_factory=dict)
    error: str | None = None

    @functools.cached_property
    def key(self) -> str:
        """A key for the sample that is the same in every process and run."""
        blob = json.dumps(self.sample, sort_keys=True, default=repr, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def needs_captions(self) -> bool:
        return self.error is None and self.plan is not None


def _parse(sample: Any, config: CaptionConfig) -> _Work:
    """Validate a sample and work out which images it asks captions for."""
    work = _Work(sample)
    if not isinstance(sample, dict):
        work.error = f"the element is a {type(sample).__name__}, not a dict sample"
        return work
    text = sample.get(config.text_key)
    if not isinstance(text, str):
        what = "has no" if config.text_key not in sample else f"has a {type(text).__name__} in its"
        work.error = f"the sample {what} {config.text_key!r} field (a str is needed)"
        return work
    images = sample.get(config.image_key)
    if images is None or (isinstance(images, (list, tuple)) and not images):
        return work  # no images: original only
    if not isinstance(images, (list, tuple)):
        work.error = (
            f"the sample's {config.image_key!r} field must be a list of image references, got {type(images).__name__}"
        )
        return work
    plan = plan_text(text, config.special_tokens)
    if plan.num_image_tokens == 0:
        return work  # images but no image token: original only (SPEC)
    if plan.num_image_tokens > len(images):
        work.error = (
            f"the text has {plan.num_image_tokens} {config.image_token} tokens but the sample has only "
            f"{len(images)} images ({config.image_key}=[{', '.join(describe_ref(r) for r in images)}])"
        )
        return work
    work.plan = plan
    work.prompt = config.prompt_for(sample)
    return work


def _load_images(work: _Work, config: CaptionConfig, draft_size: int | None) -> None:
    refs = work.sample[config.image_key]
    loaded: dict[Any, Image.Image] = {}
    for index in work.plan.image_indices:
        ref = refs[index]
        key = ref if isinstance(ref, (str, bytes)) else id(ref)
        try:
            if key not in loaded:
                loaded[key] = load_image(
                    ref,
                    image_root=config.image_root,
                    base_dir=config.image_base_dir,
                    max_pixels=config.max_image_pixels,
                    draft_size=draft_size,
                )
        except ImageLoadError as e:
            work.error = f"{e} ({config.image_key}[{index}])"
            return
        work.images[index] = fit_pixels(loaded[key], config.max_input_pixels)


Placed = tuple[Any, WindowedValue]
"""A sample paired with its place in the stream: an empty ``WindowedValue``
holding its timestamp, window and pane, which every output of the sample keeps."""


def with_placement(
    sample: Any,
    timestamp=beam.DoFn.TimestampParam,
    window=beam.DoFn.WindowParam,
    pane=beam.DoFn.PaneInfoParam,
) -> Placed:
    """Pair a sample with its timestamp, window and pane, which batching would otherwise replace."""
    return sample, WindowedValue(None, timestamp, (window,), pane)


def image_weight(item: Placed, config: CaptionConfig) -> int:
    """How many images a placed sample sends to ``generate`` (at least 1): its weight in a batch."""
    element, text_key = item[0], config.text_key
    if isinstance(element, dict) and isinstance(element.get(text_key), str) and element.get(config.image_key):
        return max(1, element[text_key].count(config.image_token))
    return 1


class CaptionDoFn(beam.DoFn):
    """Captions batches of samples.

    Outputs: generated samples on the main output (tag ``generated`` in
    ``with_outputs(..., main=GENERATED)``), input samples that were processed
    on ``original``, and failure records on ``failed``.
    """

    def __init__(self, config: CaptionConfig, handle_failures: bool = False):
        self._config = config
        self._handle_failures = handle_failures
        self._shared_handle = shared.Shared()
        self._captioner = None
        self._load_reported = False
        self._reader: ThreadPoolExecutor | None = None  # with prefetch_images: reads the next batch's images
        self._pending: tuple[Sequence[Placed], Future] | None = None  # a batch whose images are being read
        ns = METRICS_NAMESPACE
        self._samples_in = Metrics.counter(ns, "samples_in")
        self._samples_failed = Metrics.counter(ns, "samples_failed")
        self._images_captioned = Metrics.counter(ns, "images_captioned")
        self._captions_generated = Metrics.counter(ns, "captions_generated")
        self._generated_samples = Metrics.counter(ns, "generated_samples")
        self._original_samples = Metrics.counter(ns, "original_samples")
        self._model_loads = Metrics.counter(ns, "model_loads")
        self._load_ms = Metrics.distribution(ns, "model_load_ms")
        self._generate_ms = Metrics.distribution(ns, "generate_latency_ms")
        self._generate_batch = Metrics.distribution(ns, "generate_batch_size")

    def _model_tag(self) -> str:
        c = self._config
        return json.dumps([c.hf_img2seq, c.device, c.torch_dtype, c.trust_remote_code])

    def setup(self) -> None:
        from beamcap.model import load_captioner

        load = functools.partial(load_captioner, self._config)
        if self._config.shares_across_processes:
            self._attach(self._acquire_across_processes(load))
        else:
            self._attach(self._shared_handle.acquire(load, tag=self._model_tag()))

    def _attach(self, captioner) -> None:
        """Use ``captioner`` (a loaded model, or a proxy to one) for this DoFn's bundles."""
        self._captioner = captioner
        self._info = captioner.info()
        self._settings = self._config.generation_settings()
        self._progress = {"samples": 0, "images": 0, "failed": 0}
        self._started = self._last_log = time.monotonic()
        self._reader = ThreadPoolExecutor(1, "beamcap-read") if self._config.prefetch_images else None

    def _acquire_across_processes(self, load):
        """The machine-wide model (one of ``model_copies``), served to every process by a proxy."""
        from apache_beam.utils.multi_process_shared import MultiProcessShared

        copies = self._config.model_copies or 1
        digest = hashlib.sha256(self._model_tag().encode()).hexdigest()[:16]
        tag = f"beamcap-{digest}-{random.randrange(copies)}"
        return MultiProcessShared(load, tag=tag, always_proxy=True).acquire()

    def _log_progress(self, samples: int, images: int, failed: int) -> None:
        """A progress line from this DoFn instance every PROGRESS_EVERY_SECS."""
        progress = self._progress
        progress["samples"] += samples
        progress["images"] += images
        progress["failed"] += failed
        now = time.monotonic()
        if now - self._last_log >= PROGRESS_EVERY_SECS:
            self._last_log = now
            _LOGGER.info(
                "beamcap progress: %d samples, %d images captioned (%.2f images/s), %d failed",
                progress["samples"],
                progress["images"],
                progress["images"] / max(now - self._started, 1e-9),
                progress["failed"],
            )

    def _report_load(self) -> None:
        # Metrics updated in setup() are not reported: do it on the first bundle.
        if not self._load_reported:
            self._load_reported = True
            if self._captioner.claim_load_report():
                self._model_loads.inc()
                self._load_ms.update(int(self._info["load_secs"] * 1000))

    def _generate(
        self, images: Sequence[Image.Image], prompt: str | None, seeds: Sequence[int] | None
    ) -> list[list[str]]:
        start = time.perf_counter()
        captions = self._captioner.caption(images, prompt, self._settings, seeds)
        self._generate_ms.update(int((time.perf_counter() - start) * 1000))
        self._generate_batch.update(len(images))
        return captions

    def _caption_all(self, works: list[_Work]) -> None:
        """Generate candidates for every image that needs one: prompts never mixed in a call,
        at most ``gpu_batch_size`` images per call, a failed call isolated per image."""
        from beamcap.model import free_device_memory, is_out_of_memory

        groups: dict[str | None, list[tuple[_Work, int]]] = {}
        for work in works:
            if work.needs_captions:
                for index in work.plan.image_indices:
                    groups.setdefault(work.prompt, []).append((work, index))
        size = self._config.gpu_batch_size
        for prompt, jobs in groups.items():
            for start in range(0, len(jobs), size):
                chunk = jobs[start : start + size]
                outcomes = call_isolating(
                    lambda part, p=prompt: self._generate([w.images[i] for w, i in part], p, self._image_seeds(part)),
                    chunk,
                    is_oom=is_out_of_memory,
                    on_oom=free_device_memory,
                )
                for (work, index), outcome in zip(chunk, outcomes, strict=True):
                    if isinstance(outcome, Exception):
                        if work.error is None:
                            ref = describe_ref(work.sample[self._config.image_key][index])
                            work.error = (
                                f"image {ref} ({self._config.image_key}[{index}]): captioning failed: "
                                f"{type(outcome).__name__}: {outcome}"
                            )
                    else:
                        work.candidates[index] = outcome

    def _image_seeds(self, jobs: Sequence[tuple[_Work, int]]) -> list[int] | None:
        """With a seed: one per image, a function of (seed, sample, image index)."""
        if self._config.seed is None:
            return None
        return [derive_seed(self._config.seed, "generate", work.key, index) for work, index in jobs]

    def _generated_texts(self, work: _Work) -> list[str]:
        config, plan = self._config, work.plan
        order = plan.image_indices
        reference_texts = [chunk.plain_text for chunk in plan.chunks for _ in chunk.image_indices]
        rng = None
        if config.keep_candidate_mode is KeepMode.RANDOM_ANY:
            rng = sample_rng(config.seed, work.key if config.seed is not None else "")
        chosen = choose_captions(config.keep_candidate_mode, [work.candidates[i] for i in order], reference_texts, rng)
        return [
            render_text(plan, dict(zip(order, captions, strict=True)), config.special_tokens) for captions in chosen
        ]

    def start_bundle(self) -> None:
        self._pending = None  # a batch left by a failed bundle is dropped (the runner retries the bundle)

    def process(self, batch: Sequence[Placed]) -> Iterator[Any]:
        """``batch`` holds placed samples; every output keeps its sample's timestamp, window and pane.

        With ``prefetch_images``, this batch's images are read in the background
        while the previous batch generates, and its outputs come with the next
        call (or at the end of the bundle).
        """
        self._report_load()
        self._samples_in.inc(len(batch))
        if self._reader is None:
            yield from self._caption_and_emit(batch, self._read(batch))
            return
        reading = self._reader.submit(self._read, batch)
        yield from self._emit_pending()
        self._pending = (batch, reading)

    def finish_bundle(self) -> Iterator[Any]:
        yield from self._emit_pending()

    def teardown(self) -> None:
        if self._reader is not None:
            self._reader.shutdown(wait=True)
            self._reader = None

    def _emit_pending(self) -> Iterator[Any]:
        if self._pending is not None:
            batch, reading = self._pending
            self._pending = None
            yield from self._caption_and_emit(batch, reading.result())

    def _read(self, batch: Sequence[Placed]) -> list[_Work]:
        """Parse the samples and read their images (no model work: safe off the main thread)."""
        works = [_parse(sample, self._config) for sample, _ in batch]
        for work in works:
            if work.needs_captions:
                _load_images(work, self._config, self._info["input_size"])
        return works

    def _caption_and_emit(self, batch: Sequence[Placed], works: list[_Work]) -> Iterator[Any]:
        config = self._config
        self._caption_all(works)
        images = failed = 0
        for work, (_, place) in zip(works, batch, strict=True):
            if work.error is not None:
                failed += 1
                self._samples_failed.inc()
                if not self._handle_failures:
                    raise SampleError(
                        f"{work.error}. Use CaptionImages(...).with_exception_handling() to route failed "
                        "samples to a separate output instead of failing the job."
                    )
                _LOGGER.warning("Sample failed: %s", work.error)
                yield TaggedOutput(FAILED, place.with_value(failure_record(work.sample, work.error)))
                continue
            yield TaggedOutput(ORIGINAL, place.with_value(work.sample))
            if config.keep_original_sample:
                self._original_samples.inc()
            if work.plan is None:
                continue
            n_images = len(work.plan.image_indices)
            images += n_images
            self._images_captioned.inc(n_images)
            self._captions_generated.inc(n_images * config.caption_num)
            for text in self._generated_texts(work):
                generated = copy.deepcopy(work.sample)
                generated[config.text_key] = text
                self._generated_samples.inc()
                yield place.with_value(generated)  # the main output
        self._log_progress(len(works), images, failed)
