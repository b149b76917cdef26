"""``CaptionImages``: the public transform (batch -> caption -> flatten)."""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.pvalue import PCollection

from beamcap.batching import BatchByImages, restore_windowing, uses_stream_batcher
from beamcap.config import DEFAULT_MODEL, CaptionConfig
from beamcap.dj_format import DEFAULT_EOC_TOKEN, DEFAULT_IMAGE_TOKEN
from beamcap.dofn import FAILED, GENERATED, ORIGINAL, CaptionDoFn
from beamcap.retention import KeepMode


class UnsupportedRunnerError(ValueError):
    """A runner on which beamcap's output would be wrong."""


def refuse_unsafe_runner(runner: Any) -> None:
    """Refuse runners known to corrupt or drop multi-output results.

    Beam 2.77's DaskRunner puts every output of a multi-output ParDo into one
    collection (originals, generated samples and failures would be mixed),
    computes only the last sink of a pipeline, and finalises WriteToText
    output empty, all while reporting success.
    """
    if type(runner).__module__.startswith("apache_beam.runners.dask"):
        raise UnsupportedRunnerError(
            "beamcap refuses DaskRunner: in Apache Beam's DaskRunner, tagged outputs of a ParDo are not separated "
            "(original, generated and failed samples would be mixed), only the last sink is computed, and "
            "WriteToText writes an empty file, all with a successful run. Use DirectRunner, the portable runner "
            "(Flink, Spark) or Dataflow instead."
        )


class CaptionResult(NamedTuple):
    """The outputs of :meth:`CaptionImages.with_exception_handling`.

    Attributes:
        good: original and generated samples, as the retention settings keep them.
        failed: one ``{'sample': <original element>, 'error': <reason>}`` per
            sample that could not be captioned; nothing of such a sample is in ``good``.
    """

    good: PCollection
    failed: PCollection


class CaptionImages(beam.PTransform):
    """Caption the images of Data-Juicer samples and append the captioned samples.

    The Beam port of Data-Juicer's ``image_captioning_mapper``: the same
    parameters, sample format and output (see README.md and SPEC).

    Example::

        import apache_beam as beam
        from beamcap import CaptionImages

        with beam.Pipeline() as p:
            (p
             | beam.Create([{'text': '<__dj__image>a photo <|__dj__eoc|>', 'images': ['cat.jpg']}])
             | CaptionImages('beamcap-demo', caption_num=2, keep_candidate_mode='all')
             | beam.Map(print))

    Args:
        hf_img2seq: hub model id, a ``save_pretrained`` folder, or ``'beamcap-demo'``.
        trust_remote_code: passed to every ``from_pretrained``.
        caption_num: candidates generated per image (> 0).
        keep_candidate_mode: ``'random_any'``, ``'similar_one_simhash'`` or ``'all'``.
        keep_original_sample: also emit each input sample.
        prompt: one prompt for every image.
        prompt_key: a field holding a per-sample prompt (wins when it is a str).
        gpu_batch_size: most images in one ``generate`` call.
        text_key, image_key: the sample's fields.
        image_token, eoc_token: the dataset's special tokens.
        max_new_tokens, do_sample: generation settings (the reference's: 128, True).
        seed: makes ``random_any`` choices a function of the seed and the sample.
        device: ``None`` (cuda when available, else cpu), ``'cpu'``, ``'cuda:N'``.
        torch_dtype: ``None`` (float32 on CPU, bfloat16/float16 on CUDA), a
            dtype name, or ``'auto'``.
        image_root: when set, relative image paths resolve under it and nothing
            outside it is read (no absolute paths elsewhere, no URLs).
        image_base_dir: relative image paths resolve against it (a local folder
            or a Beam filesystem path); nothing is refused.
        max_image_pixels: images declaring more pixels are refused.
        max_input_pixels: images with more pixels are downscaled (aspect kept)
            before the processor: bounds the cost of models whose input grows
            with resolution (Qwen2-VL's dynamic resolution).
        min_batch_size, max_batch_size: batch bounds in images (default max:
            ``gpu_batch_size``).
        large_model: one model per machine, shared by every SDK worker process
            (``MultiProcessShared``, as RunInference's ``large_model``).
        model_copies: N models per machine shared by the processes (implies
            cross-process sharing); e.g. one per GPU-memory budget.
        max_batch_duration_secs: streaming only: the longest a sample waits
            for its batch to fill (a slow stream is captioned within it).
            Windows and timestamps are kept, and the watermark is held while
            samples wait, so downstream windows close only after them.
        streaming_shards: streaming only (with ``max_batch_duration_secs``):
            keys the waiting samples are spread over; one key is batched on
            one worker, so set it to about the number of workers (GPUs).
        prefetch_images: read and decode a batch's images in a background
            thread while the previous batch generates (outputs of a batch then
            come with the next one, or at the end of the bundle).
        **generate_kwargs: further ``generate`` arguments (``num_beams``, ``top_p``, ...).
    """

    def __init__(
        self,
        hf_img2seq: str = DEFAULT_MODEL,
        trust_remote_code: bool = False,
        caption_num: int = 1,
        keep_candidate_mode: str | KeepMode = "random_any",
        keep_original_sample: bool = True,
        prompt: str | None = None,
        prompt_key: str | None = None,
        gpu_batch_size: int = 8,
        *,
        text_key: str = "text",
        image_key: str = "images",
        image_token: str = DEFAULT_IMAGE_TOKEN,
        eoc_token: str = DEFAULT_EOC_TOKEN,
        max_new_tokens: int = 128,
        do_sample: bool = True,
        seed: int | None = None,
        device: str | None = None,
        torch_dtype: Any = None,
        image_root: str | None = None,
        image_base_dir: str | None = None,
        max_image_pixels: int | None = None,
        max_input_pixels: int | None = None,
        min_batch_size: int = 1,
        max_batch_size: int | None = None,
        large_model: bool = False,
        model_copies: int | None = None,
        max_batch_duration_secs: float | None = None,
        streaming_shards: int = 1,
        prefetch_images: bool = False,
        **generate_kwargs: Any,
    ):
        super().__init__()
        extras = {} if max_image_pixels is None else {"max_image_pixels": max_image_pixels}
        self.config = CaptionConfig(
            hf_img2seq=hf_img2seq,
            trust_remote_code=trust_remote_code,
            caption_num=caption_num,
            keep_candidate_mode=keep_candidate_mode,
            keep_original_sample=keep_original_sample,
            prompt=prompt,
            prompt_key=prompt_key,
            gpu_batch_size=gpu_batch_size,
            text_key=text_key,
            image_key=image_key,
            image_token=image_token,
            eoc_token=eoc_token,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            seed=seed,
            device=device,
            torch_dtype=torch_dtype,
            image_root=image_root,
            image_base_dir=image_base_dir,
            max_input_pixels=max_input_pixels,
            min_batch_size=min_batch_size,
            max_batch_size=max_batch_size,
            large_model=large_model,
            model_copies=model_copies,
            max_batch_duration_secs=max_batch_duration_secs,
            streaming_shards=streaming_shards,
            prefetch_images=prefetch_images,
            generate_kwargs=generate_kwargs,
            **extras,
        )
        self._handle_failures = False

    @classmethod
    def from_config(cls, config: CaptionConfig) -> CaptionImages:
        """The transform for an already validated :class:`CaptionConfig` (as the job builds it)."""
        transform = cls.__new__(cls)
        beam.PTransform.__init__(transform)
        transform.config = config
        transform._handle_failures = False
        return transform

    def with_exception_handling(self) -> CaptionImages:
        """The same transform, returning :class:`CaptionResult` ``(good, failed)``
        instead of failing the job on a sample that cannot be captioned."""
        handled = copy.copy(self)
        handled._handle_failures = True
        return handled

    def expand(self, samples: PCollection) -> PCollection | CaptionResult:
        refuse_unsafe_runner(samples.pipeline.runner)
        config = self.config
        outputs = (
            samples
            | "BatchByImages" >> BatchByImages(config)
            | "Caption"
            >> beam.ParDo(CaptionDoFn(config, self._handle_failures)).with_outputs(FAILED, ORIGINAL, main=GENERATED)
        )
        if uses_stream_batcher(config, samples):
            restore_windowing([outputs[GENERATED], outputs[ORIGINAL], outputs[FAILED]], samples.windowing)
        kept = [outputs[GENERATED]]
        if config.keep_original_sample:
            kept.append(outputs[ORIGINAL])
        good = kept | "FlattenKept" >> beam.Flatten()
        if self._handle_failures:
            return CaptionResult(good, outputs[FAILED])
        return good
