"""The first stage: each input element parsed once into a :class:`Work` item, before batching.

Parsing validates the sample, works out which images its text asks captions
for, its prompt and its weight in a batch (the images it sends to
``generate``), and records where the sample sits in the stream (timestamp,
window, pane) so that every output of the sample keeps it. Batching, the DoFn
and the outputs all read these facts from the item instead of working them out
again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
from apache_beam.utils.windowed_value import WindowedValue
from PIL import Image

from beamcap.config import CaptionConfig
from beamcap.dj_format import TextPlan, plan_text
from beamcap.images import ImageLoadError, describe_ref, fit_pixels, load_image

MAX_SAMPLE_DEPTH = 100
"""Samples nested deeper than this (dicts and lists inside each other) are refused: copying or hashing them
recursively could exhaust the stack."""


MAX_PROMPT_CHARS = 200_000
"""Prompts longer than this are refused before tokenizing (a per-sample prompt can be of any length; a
context-long prompt is far shorter), so a huge one costs no tokenizer memory."""


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
        key: a key for the sample that is the same in every process and run (set when ``seed`` is).
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
    key: str | None = None
    images: dict[int, Image.Image] = field(default_factory=dict)
    candidates: dict[int, list[str]] = field(default_factory=dict)

    @property
    def needs_captions(self) -> bool:
        return self.error is None and self.plan is not None

    @property
    def weight(self) -> int:
        """How many images the sample sends to ``generate`` (at least 1): its weight in a batch."""
        return len(self.plan.image_indices) if self.needs_captions else 1


def nesting_depth(value: Any, limit: int) -> int:
    """How deeply dicts, lists and tuples nest in ``value`` (a scalar is 0), counted without recursion and up to
    ``limit + 1`` at most."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, depth + 1)
        if deepest > limit:  # a cycle (a sample that contains itself) ends here too
            return deepest
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list, tuple)))
    return deepest


def _canonical(value: Any) -> Any:
    """``value`` with every dict key a str (non-str keys typed and repr'd), so it sorts and serialises."""
    if isinstance(value, dict):
        return {k if isinstance(k, str) else f"<{type(k).__name__}>{k!r}": _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def sample_key(sample: Any) -> str:
    """A key for ``sample`` that is the same in every process and run (a hash of its canonical JSON)."""
    blob = json.dumps(_canonical(sample), sort_keys=True, default=repr, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


def parse(sample: Any, config: CaptionConfig) -> Work:
    """Validate a sample and work out which images it asks captions for, and with which prompt.

    This is the first part of the sample's isolation boundary: whatever a sample holds, parsing it never raises;
    a sample that cannot be parsed gets an error saying why.
    """
    work = Work(sample)
    try:
        _parse_into(work, config)
    except Exception as e:  # noqa: BLE001 - a sample can hold anything; it fails alone
        work.plan, work.error = None, f"cannot parse the sample: {type(e).__name__}: {e}"
    return work


def _parse_into(work: Work, config: CaptionConfig) -> None:
    sample = work.sample
    if not isinstance(sample, dict):
        work.error = f"the element is a {type(sample).__name__}, not a dict sample"
        return
    if nesting_depth(sample, MAX_SAMPLE_DEPTH) > MAX_SAMPLE_DEPTH:
        work.error = f"the sample is nested more than {MAX_SAMPLE_DEPTH} levels deep (dicts and lists)"
        return
    text = sample.get(config.text_key)
    if not isinstance(text, str):
        what = "has no" if config.text_key not in sample else f"has a {type(text).__name__} in its"
        work.error = f"the sample {what} {config.text_key!r} field (a str is needed)"
        return
    images = sample.get(config.image_key)
    if images is None or (isinstance(images, (list, tuple)) and not images):
        return  # no images: original only
    if not isinstance(images, (list, tuple)):
        work.error = (
            f"the sample's {config.image_key!r} field must be a list of image references, "
            f"got {type(images).__name__} {describe_ref(images)}"
        )
        return
    plan = plan_text(text, config.special_tokens)
    if plan.num_image_tokens == 0:
        return  # images but no image token: original only (docs/behaviour.md)
    if plan.num_image_tokens > len(images):
        work.error = (
            f"the text has {plan.num_image_tokens} {config.image_token} tokens but the sample has only "
            f"{len(images)} images ({config.image_key}=[{', '.join(describe_ref(r) for r in images[:5])}"
            f"{', ...' if len(images) > 5 else ''}])"
        )
        return
    prompt = config.prompt_for(sample)
    if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
        work.error = (
            f"the prompt is {len(prompt)} characters, more than the "
            f"{MAX_PROMPT_CHARS} beamcap tokenizes (no image-to-text model's context holds it): shorten it"
        )
        return
    if config.seed is not None:
        work.key = sample_key(sample)
    work.plan, work.prompt = plan, prompt


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


def load_images(
    work: Work, config: CaptionConfig, draft_size: int | None, indices: Sequence[int] | None = None
) -> None:
    """Read and decode the images ``work`` asks captions for (those at ``indices``, by default all of them) into
    ``work.images``; on the first failure, set ``work.error``.

    The second part of the sample's isolation boundary: nothing a reference points at makes this raise.
    """
    refs = work.sample[config.image_key]
    loaded: dict[Any, Image.Image] = {}
    for index in work.plan.image_indices if indices is None else indices:
        ref = refs[index]
        key = ref if isinstance(ref, (str, bytes)) else id(ref)
        try:
            if key not in loaded:
                loaded[key] = load_image(
                    ref,
                    image_root=config.image_root,
                    base_dir=config.image_base_dir,
                    max_pixels=config.max_image_pixels,
                    max_aspect_ratio=config.max_aspect_ratio,
                    max_bytes=config.max_image_bytes,
                    download_timeout=config.download_timeout_secs,
                    draft_size=draft_size,
                )
            work.images[index] = fit_pixels(loaded[key], config.max_input_pixels)
        except ImageLoadError as e:
            work.error = f"{e} ({config.image_key}[{index}])"
        except Exception as e:  # noqa: BLE001 - whatever else goes wrong with one image fails its sample alone
            work.error = f"image {describe_ref(ref)} ({config.image_key}[{index}]): {type(e).__name__}: {e}"
        if work.error is not None:
            work.images.clear()
            return
