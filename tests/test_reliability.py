"""Every bad input accounted for; determinism; out-of-memory; threads."""

from __future__ import annotations

import io
import os
import random

import apache_beam as beam
import pytest
import torch
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import BeamAssertException, assert_that, equal_to
from helpers import IMG, canonical, process, run_dofn, same_elements
from PIL import Image
from test_images import png_with_declared_size

from beamcap import CaptionConfig, CaptionImages
from beamcap.devices import is_out_of_memory, memory_that_ran_out
from beamcap.dofn import CaptionDoFn
from beamcap.model import Captioner

FAST = {"max_new_tokens": 4}
GREEDY = dict(caption_num=2, keep_candidate_mode="all", do_sample=False, gpu_batch_size=3, **FAST)


def good_samples(image_dir):
    return [
        {"id": "g1", "text": f"{IMG}one", "images": [str(image_dir / "red.jpg")]},
        {"id": "g2", "text": f"{IMG}{IMG}two", "images": [str(image_dir / "blue.png"), str(image_dir / "green.jpg")]},
        {"id": "g3", "text": "no image", "images": []},
    ]


def _file(d, name, data: bytes):
    path = d / name
    path.write_bytes(data)
    return str(path)


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _truncated(fmt):
    data = _encoded(Image.effect_noise((64, 64), 40).convert("RGB"), fmt)
    return data[: len(data) // 2]


# (id, make(tmp_path) -> bad sample, expected substring of the reason or None when the sample is good)
BAD_INPUTS = [
    ("missing_file", lambda d: {"text": IMG, "images": [str(d / "nope.jpg")]}, "file not found"),
    ("zero_bytes", lambda d: {"text": IMG, "images": [_file(d, "z.jpg", b"")]}, "the file is empty"),
    ("truncated_jpeg", lambda d: {"text": IMG, "images": [_file(d, "t.jpg", _truncated("JPEG"))]}, "truncated"),
    ("truncated_png", lambda d: {"text": IMG, "images": [_file(d, "t.png", _truncated("PNG"))]}, "truncated"),
    (
        "random_bytes",
        lambda d: {"text": IMG, "images": [_file(d, "r.jpg", random.Random(999).randbytes(999))]},
        "not a recognised",
    ),
    ("text_as_jpg", lambda d: {"text": IMG, "images": [_file(d, "t.jpg", b"hello world")]}, "not a recognised"),
    (
        "decompression_bomb",
        lambda d: {"text": IMG, "images": [_file(d, "b.png", png_with_declared_size(4000, 4000))]},
        "over the max_image_pixels limit",
    ),
    ("images_is_str", lambda d: {"text": IMG, "images": "a.jpg"}, "must be a list of image references, got str"),
    ("text_missing", lambda d: {"images": []}, "has no 'text' field"),
    ("text_not_str", lambda d: {"text": 5, "images": []}, "has a int in its 'text' field"),
    ("too_many_tokens", lambda d: {"text": IMG * 3, "images": [str(d / "x.jpg")]}, "3 <__dj__image> tokens"),
    ("http_unreachable", lambda d: {"text": IMG, "images": ["http://127.0.0.1:9/x.jpg"]}, "cannot download"),
    ("non_dict", lambda d: ["not", "a", "dict"], "not a dict sample"),
    (
        "corrupt_bytes",
        lambda d: {"text": IMG, "images": [b"\x89PNG\r\n\x1a\nnope"]},
        "image <12 bytes>: not a recognised image format",
    ),
    ("image_ref_int", lambda d: {"text": IMG, "images": [42]}, "not int"),
]


@pytest.fixture(scope="module")
def clean(blip_dir, image_dir):
    """The good samples' outputs without a bad one beside them (computed once)."""
    return run_dofn(
        CaptionConfig(blip_dir, max_image_pixels=1_000_000, **GREEDY), good_samples(image_dir), batch_size=3
    )


@pytest.mark.parametrize("make, reason", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_fails_alone_and_good_samples_are_unchanged(blip_dir, image_dir, tmp_path, clean, make, reason):
    """Each kind in one batch with the good samples (the DoFn on that batch): it fails alone, with its reason."""
    good = good_samples(image_dir)
    bad = make(tmp_path)
    out = run_dofn(CaptionConfig(blip_dir, max_image_pixels=1_000_000, **GREEDY), [good[0], bad, *good[1:]], 4)
    assert canonical(out["generated"]) == canonical(clean["generated"])
    assert canonical(out["original"]) == canonical(clean["original"])
    assert len(out["failed"]) == 1 and out["failed"][0]["sample"] == bad and reason in out["failed"][0]["error"]


def test_every_bad_input_through_the_transform_at_once(blip_dir, image_dir, tmp_path, clean):
    """All the kinds among the good samples through the public transform: each fails alone with its reason, and
    the good samples come out as they do alone."""
    good = good_samples(image_dir)
    folders = [tmp_path / name for name, _, _ in BAD_INPUTS]
    for folder in folders:
        folder.mkdir()
    bad = [(make(folder), reason) for folder, (_, make, reason) in zip(folders, BAD_INPUTS, strict=True)]
    with TestPipeline() as p:
        result = (
            p
            | beam.Create([good[0], *(b for b, _ in bad), *good[1:]])
            | CaptionImages(blip_dir, max_image_pixels=1_000_000, **GREEDY).with_exception_handling()
        )
        assert_that(result.good, same_elements(clean["generated"] + clean["original"]), label="good")
        assert_that(result.failed, failed_with(bad), label="failed")


def failed_with(expected: list[tuple]):
    """Matcher: exactly one failure per (sample, reason substring)."""

    def check(actual):
        unmatched = list(actual)
        for sample, reason in expected:
            found = [f for f in unmatched if f["sample"] == sample and reason in f["error"]]
            if len(found) != 1:
                raise BeamAssertException(f"expected one failure for {sample!r} with {reason!r}, got {actual}")
            unmatched.remove(found[0])
        if unmatched:
            raise BeamAssertException(f"unexpected failures: {unmatched}")

    return check


# Inputs that are not failures: docs/behaviour.md says what they give.
ODD_BUT_VALID = [
    ("images_missing", {"text": IMG}, 1, 0),
    ("images_none", {"text": IMG, "images": None}, 1, 0),
    ("more_images_than_tokens", {"text": IMG, "images": ["red.jpg", "no-such-file.jpg"]}, 1, 1),
    ("prompt_key_not_str", {"text": IMG, "images": ["red.jpg"], "p": 42}, 1, 1),
    ("unusual_modes", {"text": IMG * 3, "images": ["cmyk.tif", "la.png", "i16.png"]}, 1, 1),
    ("tiny_and_wide", {"text": IMG * 2, "images": ["tiny.png", "wide.png"]}, 1, 1),
    ("animated_gif", {"text": IMG, "images": ["anim.gif"]}, 1, 1),
]


@pytest.fixture(scope="module")
def odd_config(blip_dir, image_dir):
    """The odd images written into image_dir, and the settings these tests run with."""
    Image.new("CMYK", (9, 9), (0, 200, 200, 0)).save(image_dir / "cmyk.tif")
    Image.new("LA", (9, 9), (100, 50)).save(image_dir / "la.png")
    Image.new("I;16", (9, 9), 30000).save(image_dir / "i16.png")
    Image.new("RGB", (1, 1)).save(image_dir / "tiny.png")
    Image.new("RGB", (1000, 10)).save(image_dir / "wide.png")
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    frames[0].save(image_dir / "anim.gif", save_all=True, append_images=frames[1:])
    return dict(prompt="a photo of", prompt_key="p", image_root=str(image_dir), **GREEDY)


@pytest.mark.parametrize(
    "sample, originals, generated", [o[1:] for o in ODD_BUT_VALID], ids=[o[0] for o in ODD_BUT_VALID]
)
def test_odd_but_valid_inputs(blip_dir, image_dir, odd_config, sample, originals, generated):
    config = CaptionConfig(blip_dir, **odd_config)
    alone = run_dofn(config, [sample])
    k = GREEDY["caption_num"]
    assert (len(alone["original"]), len(alone["generated"]), alone["failed"]) == (originals, generated * k, [])
    if "p" in sample:
        assert all("a photo of" in g["text"] for g in alone["generated"])
    # In one batch with good samples: they come out exactly as they do each alone.
    good = good_samples(image_dir)
    expected = run_dofn(config, [*good, sample], batch_size=1)
    together = run_dofn(config, [good[0], sample, *good[1:]], batch_size=4)
    assert canonical(together["generated"] + together["original"]) == canonical(
        expected["generated"] + expected["original"]
    )
    assert together["failed"] == []


def test_every_odd_input_through_the_transform_at_once(blip_dir, image_dir, odd_config):
    """All the odd inputs among the good samples through the public transform: nothing fails, and every sample
    comes out as it does alone."""
    config = CaptionConfig(blip_dir, **odd_config)
    samples = [*good_samples(image_dir), *(sample for _, sample, _, _ in ODD_BUT_VALID)]
    expected = run_dofn(config, samples, batch_size=1)
    with TestPipeline() as p:
        result = p | beam.Create(samples) | CaptionImages(blip_dir, **odd_config).with_exception_handling()
        assert_that(result.good, same_elements(expected["generated"] + expected["original"]), label="good")
        assert_that(result.failed, equal_to([]), label="failed")


@pytest.mark.parametrize("mode", ["random_any", "similar_one_simhash", "all"])
@pytest.mark.slow
def test_seeded_sampling_is_independent_of_batching_and_reruns(blip_dir, image_dir, mode):
    samples = good_samples(image_dir) * 2 + [
        {"id": "g4", "text": f"{IMG} x", "images": [str(image_dir / "yellow.jpg")]}
    ]
    config = dict(caption_num=3, keep_candidate_mode=mode, do_sample=True, seed=1234, max_new_tokens=6)
    runs = [
        run_dofn(CaptionConfig(blip_dir, gpu_batch_size=1, **config), samples, batch_size=1),
        run_dofn(CaptionConfig(blip_dir, gpu_batch_size=4, **config), samples, batch_size=5),
        run_dofn(CaptionConfig(blip_dir, gpu_batch_size=5, **config), samples, batch_size=len(samples)),
    ]
    texts = [canonical(r["generated"]) for r in runs]
    assert texts[0] == texts[1] == texts[2]
    other_seed = run_dofn(CaptionConfig(blip_dir, gpu_batch_size=4, **{**config, "seed": 99}), samples, batch_size=5)
    assert canonical(other_seed["generated"]) != texts[0]


def test_seeded_sampling_respects_warpers(blip_dir, image_dir):
    samples = good_samples(image_dir)
    greedy = run_dofn(CaptionConfig(blip_dir, do_sample=False, **FAST), samples)
    top1 = run_dofn(CaptionConfig(blip_dir, do_sample=True, seed=3, generate_kwargs={"top_k": 1}, **FAST), samples)
    assert canonical(top1["generated"]) == canonical(greedy["generated"])


def test_seeded_pipeline_runs_are_identical(blip_dir, image_dir):
    samples = good_samples(image_dir)
    expected = run_dofn(CaptionConfig(blip_dir, caption_num=2, seed=5, **FAST), samples, batch_size=2)
    with TestPipeline() as p:
        out = p | beam.Create(samples) | CaptionImages(blip_dir, caption_num=2, seed=5, **FAST)
        assert_that(out, same_elements(expected["generated"] + expected["original"]))


class _OOMInjector:
    """Wraps the real generate step (``Captioner.caption``): raises CUDA out-of-memory for calls over ``limit``
    images or containing a poisoned image size."""

    def __init__(self, limit, poisoned_width=None):
        self.real, self.limit, self.poisoned_width, self.sizes = Captioner.caption, limit, poisoned_width, []

    def __call__(self, captioner, images, prompt, settings, seeds=None):
        self.sizes.append(len(images))
        if len(images) > self.limit or any(im.width == self.poisoned_width for im in images):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.real(captioner, images, prompt, settings, seeds)


def _dofn_with(config, injector, monkeypatch):
    dofn = CaptionDoFn(config, handle_failures=True)
    dofn.setup()
    monkeypatch.setattr(Captioner, "caption", lambda captioner, *args: injector(captioner, *args))
    return dofn


def test_out_of_memory_halves_the_call_until_it_fits(blip_dir, image_dir, monkeypatch):
    samples = [{"id": i, "text": IMG, "images": [str(image_dir / "red.jpg")]} for i in range(8)]
    config = CaptionConfig(blip_dir, gpu_batch_size=8, do_sample=False, **FAST)
    expected = run_dofn(config, samples, batch_size=8)
    injector = _OOMInjector(limit=2)
    outputs = process(_dofn_with(config, injector, monkeypatch), config, samples)
    assert injector.sizes == [8, 4, 2, 2, 4, 2, 2]
    assert canonical(outputs["generated"]) == canonical(expected["generated"])


def test_an_image_that_runs_out_of_memory_alone_fails_the_bundle_loudly(blip_dir, image_dir, tmp_path, monkeypatch):
    """Halving down to one image that still does not fit is the device's limit, not the sample's fault: the bundle
    fails (as a model that cannot load does), with a message naming the image and what to change."""
    Image.new("RGB", (77, 20), "blue").save(tmp_path / "huge.png")
    samples = [{"id": i, "text": IMG, "images": [str(image_dir / "red.jpg")]} for i in range(5)]
    samples.insert(2, {"id": "big", "text": IMG, "images": [str(tmp_path / "huge.png")]})
    config = CaptionConfig(blip_dir, gpu_batch_size=8, do_sample=False, **FAST)
    injector = _OOMInjector(limit=8, poisoned_width=77)
    with pytest.raises(RuntimeError, match="huge.png.*out of memory on cpu with this one image alone") as e:
        process(_dofn_with(config, injector, monkeypatch), config, samples)
    assert isinstance(e.value.__cause__, torch.cuda.OutOfMemoryError)


def test_a_real_cpu_allocation_failure_is_the_devices_limit_not_the_samples(blip_dir, image_dir):
    """caption_num=10**8 asks torch's CPU allocator for terabytes: that is out of memory (halved down to one image,
    then the bundle fails loudly), not a failure of each sample in turn with the job exiting 0."""
    samples = [{"id": i, "text": IMG, "images": [str(image_dir / "red.jpg")]} for i in range(2)]
    config = CaptionConfig(blip_dir, caption_num=10**8, gpu_batch_size=2, **FAST)
    with pytest.raises(RuntimeError, match="out of memory on cpu with this one image alone") as e:
        run_dofn(config, samples, batch_size=2)
    assert "can't allocate memory" in str(e.value.__cause__)


@pytest.mark.parametrize(
    ("error", "where"),
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "cuda:0"),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), "cpu"),
        (MemoryError(), "cpu"),
    ],
)
def test_the_memory_that_ran_out_is_named_the_hosts_or_the_devices(error, where):
    """A GPU job whose host allocator fails is told so, not that the GPU is full."""
    assert is_out_of_memory(error)
    assert memory_that_ran_out(error, "cuda:0") == where


def test_many_threads_share_one_model(blip_dir, image_dir):
    """DirectRunner with 6 threads: one model load in the process, and the same captions as one thread."""
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.options.pipeline_options import PipelineOptions

    from beamcap import METRICS_NAMESPACE

    config = dict(do_sample=False, caption_num=2, keep_candidate_mode="all", gpu_batch_size=1, **FAST)
    samples = good_samples(image_dir) * 8
    expected = run_dofn(CaptionConfig(blip_dir, **config), samples, batch_size=3)
    options = PipelineOptions(direct_running_mode="multi_threading", direct_num_workers=6)
    p = TestPipeline(options=options)
    out = p | beam.Create(samples) | beam.Reshuffle() | CaptionImages(blip_dir, **config)
    assert_that(out, same_elements(expected["generated"] + expected["original"]))
    result = p.run()
    result.wait_until_finish()
    counters = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE).with_name("model_loads"))
    assert sum(c.committed for c in counters["counters"]) == 1


def _open_denying(path_suffix):
    real_open = os.open

    def guarded(path, *args, **kwargs):
        if str(path).endswith(path_suffix):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    return guarded


def test_unreadable_file_fails_alone_even_as_root(blip_dir, image_dir, tmp_path, monkeypatch, clean):
    """Root reads mode-000 files, so CI (root) cannot make one; the OS error is raised at os.open() instead."""
    Image.new("RGB", (8, 8)).save(tmp_path / "locked.jpg")
    monkeypatch.setattr(os, "open", _open_denying("locked.jpg"))
    good = good_samples(image_dir)
    bad = {"text": IMG, "images": [str(tmp_path / "locked.jpg")]}
    with TestPipeline() as p:
        result = (
            p
            | beam.Create([good[0], bad, *good[1:]])
            | CaptionImages(blip_dir, max_image_pixels=1_000_000, **GREEDY).with_exception_handling()
        )
        assert_that(result.good, same_elements(clean["generated"] + clean["original"]), label="good")
        assert_that(result.failed, failed_with([(bad, "permission denied")]), label="failed")
