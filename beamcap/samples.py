"""The first stage: each input element parsed once into a :class:`Work` item, before batching.

Parsing validates the sample, works out which images its text asks captions
for, its prompt and its weight in a batch (the images it sends to
``generate``), and records where the sample sits in the stream (timestamp,
window, pane) so that every output of the sample keeps it. Batching, the DoFn
and the outputs all read these facts from the item instead of working them out
again.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
from apache_beam.utils.windowed_value import WindowedValue
from PIL import Image

from beamcap.config import CaptionConfig
from beamcap.dj_format import TextPlan, plan_text
from beamcap.images import ImageLoadError, describe_ref, fit_pixels, load_image


class SampleError(Exception):
    """A sample that cannot be captioned (raised when failures are not handled)."""


@dataclass
class Work:
    """One input sample on its way through batching and captioning.

    Attributes:
        sample: the input element, never modified.
        timestamp, window, pane: where the element sits in the stream; every output of it is placed there.
        plan: what the text asks for (None: the sample is passed through, or it failed).
        prompt: the prompt of every image of the sample.
        error: why the sample cannot be captioned (None while it can).
        images: the decoded images, by image index (filled by the DoFn).
        candidates: the caption candidates, by image index (filled by the DoFn).
    """

    sample: Any
    timestamp: Any = None
    window: Any = None
    pane: Any = None
    plan: TextPlan | None = None
    prompt: str | None = None
    error: str | None = None
    images: dict[int, Image.Image] = field(default_factory=dict)
    candidates: dict[int, list[str]] = field(default_factory=dict)

    @property
    def needs_captions(self) -> bool:
        return self.error is None and self.plan is not None

    @property
    def weight(self) -> int:
        """How many images the sample sends to ``generate`` (at least 1): its weight in a batch."""
        return len(self.plan.image_indices) if self.needs_captions else 1

    @functools.cached_property
    def key(self) -> str:
        """A key for the sample that is the same in every process and run."""
        blob = json.dumps(self.sample, sort_keys=True, default=repr, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()


def parse(sample: Any, config: CaptionConfig) -> Work:
    """Validate a sample and work out which images it asks captions for, and with which prompt."""
    work = Work(sample)
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
        return work  # images but no image token: original only (docs/behaviour.md)
    if plan.num_image_tokens > len(images):
        work.error = (
            f"the text has {plan.num_image_tokens} {config.image_token} tokens but the sample has only "
            f"{len(images)} images ({config.image_key}=[{', '.join(describe_ref(r) for r in images)}])"
        )
        return work
    work.plan = plan
    work.prompt = config.prompt_for(sample)
    return work


def parse_placed(
    sample: Any,
    config: CaptionConfig,
    timestamp=beam.DoFn.TimestampParam,
    window=beam.DoFn.WindowParam,
    pane=beam.DoFn.PaneInfoParam,
) -> Work:
    """:func:`parse`, recording the element's timestamp, window and pane (which batching replaces)."""
    work = parse(sample, config)
    work.timestamp, work.window, work.pane = timestamp, window, pane
    return work


def placed(value: Any, work: Work) -> WindowedValue:
    """``value`` at ``work``'s timestamp, in its window and pane: how the DoFn emits every output of a sample.

    Beam has no public way for a DoFn to emit into a given window: a ``TimestampedValue`` is re-assigned by the
    WindowFn (a sample in sliding windows would be multiplied), and after batching the DoFn's input is in the
    batch's window, not the sample's. So this builds the ``WindowedValue`` that Beam's own ``BatchElements``
    emits; tests/test_batching.py fails if Beam stops accepting it.
    """
    return WindowedValue(value, work.timestamp, (work.window,), work.pane)


def load_images(work: Work, config: CaptionConfig, draft_size: int | None) -> None:
    """Read and decode the images ``work`` asks captions for; on the first failure, set ``work.error``."""
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
