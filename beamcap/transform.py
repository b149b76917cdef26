"""``CaptionImages``: the public transform (batch -> caption -> flatten)."""

from __future__ import annotations

import copy
import dataclasses
import textwrap
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.pvalue import PCollection

from beamcap.batching import BatchByImages, restore_windowing, uses_stream_batcher
from beamcap.config import DEFAULT_MODEL, CaptionConfig, args_docstring
from beamcap.dj_format import DEFAULT_EOC_TOKEN, DEFAULT_IMAGE_TOKEN
from beamcap.dofn import FAILED, GENERATED, ORIGINAL, CaptionDoFn
from beamcap.images import (
    DEFAULT_DOWNLOAD_TIMEOUT_SECS,
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
)
from beamcap.retention import KeepMode

_FIELDS = frozenset(f.name for f in dataclasses.fields(CaptionConfig))


class UnsupportedRunnerError(ValueError):
    """A runner on which beamcap's output would be wrong."""


def refuse_unsafe_runner(runner: Any) -> None:
    """Refuse runners known to corrupt or drop multi-output results.

    Beam's DaskRunner (measured on 2.77) puts every output of a multi-output ParDo into one
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
    parameters, sample format and output (docs/behaviour.md). Building it
    validates the configuration and loads nothing; the model is loaded on the
    workers.

    Example::

        import apache_beam as beam
        from beamcap import CaptionImages

        with beam.Pipeline() as p:
            (p
             | beam.Create([{'text': '<__dj__image>a photo <|__dj__eoc|>', 'images': ['cat.jpg']}])
             | CaptionImages('beamcap-demo', caption_num=2, keep_candidate_mode='all')
             | beam.Map(print))
    """

    # The signature repeats the names and defaults declared in CaptionConfig (tests/test_config.py proves them
    # equal); the help for each is appended to this docstring from the same declarations, below the class.
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
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_aspect_ratio: int = DEFAULT_MAX_ASPECT_RATIO,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        download_timeout_secs: float = DEFAULT_DOWNLOAD_TIMEOUT_SECS,
        max_input_pixels: int | None = None,
        min_batch_size: int = 1,
        max_batch_size: int | None = None,
        large_model: bool = False,
        model_copies: int | None = None,
        max_batch_duration_secs: float | None = None,
        streaming_shards: int = 1,
        shared_image_pass: bool = True,
        **generate_kwargs: Any,
    ):
        arguments = {name: value for name, value in locals().items() if name in _FIELDS}
        super().__init__()
        self.config = CaptionConfig(**arguments)
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


CaptionImages.__doc__ = f"{CaptionImages.__doc__.rstrip()}\n\n{textwrap.indent(args_docstring(), '    ')}\n"
