"""Real Beam pipelines on tiny real models: docs/behaviour.md, point by point."""

from __future__ import annotations

import copy

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import BeamAssertException, assert_that, equal_to
from helpers import EOC, GENERATED_TEXT, IMG, canonical, has_counts, run_dofn, same_elements

from beamcap import METRICS_NAMESPACE, CaptionConfig, CaptionImages
from beamcap.model import Captioner, load_captioner
from beamcap.samples import load_images, parse

FAST = {"max_new_tokens": 4}


def samples_for(image_dir):
    """One sample of each output-table row, each tagged with its original text."""
    img = lambda c: str(image_dir / f"{c}.jpg")  # noqa: E731
    raw = [
        {"text": f"{IMG}a photo of a cat{EOC}", "images": [img("red")]},  # 1 image
        {"text": f"{IMG}{IMG} two {EOC} words {EOC}{IMG}", "images": [img("red"), img("blue"), img("green")]},
        {"text": "no images at all", "images": []},
        {"text": "images key missing"},
        {"text": "an image but no token", "images": [img("red")]},
        {"text": f"{IMG} token but images None", "images": None},
    ]
    return [dict(s, _orig=s["text"]) for s in raw]


CAPTIONED = 2  # samples above with at least one image token and images
UNCAPTIONED = 4


@pytest.mark.parametrize("mode", ["random_any", "similar_one_simhash", "all"])
@pytest.mark.parametrize("keep", [True, False])
def test_output_counts_for_every_mode_and_retention(blip_dir, image_dir, mode, keep):
    caption_num = 3
    k = caption_num if mode == "all" else 1
    samples = samples_for(image_dir)
    originals = len(samples) if keep else 0
    with TestPipeline() as p:
        out = (
            p
            | beam.Create(samples)
            | CaptionImages(
                blip_dir,
                caption_num=caption_num,
                keep_candidate_mode=mode,
                keep_original_sample=keep,
                gpu_batch_size=2,
                **FAST,
            )
        )
        assert_that(out, has_counts(originals, CAPTIONED * k))


def check_generated_format(actual):
    for sample in actual:
        if sample["text"] == sample["_orig"]:
            continue
        chunks = sample["text"].split(EOC)[:-1]
        if not sample["text"].endswith(EOC):
            raise BeamAssertException(f"no trailing eoc: {sample}")
        for chunk in chunks:
            if chunk and not GENERATED_TEXT.match(chunk + EOC):
                raise BeamAssertException(f"bad chunk {chunk!r} in {sample}")
        # Only the text changes.
        rest = {k: v for k, v in sample.items() if k != "text"}
        if rest["images"] is None or "_orig" not in rest:
            raise BeamAssertException(f"fields changed: {sample}")


def test_generated_text_format_and_other_fields_copied(blip_dir, image_dir):
    with TestPipeline() as p:
        out = (
            p
            | beam.Create(samples_for(image_dir))
            | CaptionImages(blip_dir, caption_num=2, keep_candidate_mode="all", **FAST)
        )
        assert_that(out, check_generated_format)


def test_multi_chunk_structure_kept(blip_dir, image_dir):
    sample = samples_for(image_dir)[1]
    out = run_dofn(CaptionConfig(blip_dir, **FAST), [sample])
    (text,) = [s["text"] for s in out["generated"]]
    chunks = text.split(EOC)
    assert len(chunks) == 4 and chunks[-1] == ""
    assert chunks[0].count(IMG) == 2 and chunks[1] == "" and chunks[2].count(IMG) == 1


def test_batched_equals_unbatched(blip_dir, image_dir):
    # Greedy/beam decoding is deterministic: the output must not depend on batching.
    samples = samples_for(image_dir) * 3
    config = dict(caption_num=2, keep_candidate_mode="all", do_sample=False, **FAST)
    unbatched = run_dofn(CaptionConfig(blip_dir, gpu_batch_size=1, **config), samples, batch_size=1)
    expected = unbatched["generated"] + unbatched["original"]
    for gpu_batch_size, max_batch_size in [(1, None), (4, None), (3, 12)]:
        with TestPipeline() as p:
            out = (
                p
                | beam.Create(samples)
                | CaptionImages(blip_dir, gpu_batch_size=gpu_batch_size, max_batch_size=max_batch_size, **config)
            )
            assert_that(out, same_elements(expected))


def test_prompt_groups_never_mixed_and_calls_bounded(blip_dir, image_dir, monkeypatch):
    calls = []
    real = Captioner.caption

    def recording(captioner, images, prompt, settings, seeds=None):  # a wrapper around the real model
        calls.append((prompt, len(images)))
        return real(captioner, images, prompt, settings, seeds)

    monkeypatch.setattr(Captioner, "caption", recording)
    img = str(image_dir / "red.jpg")
    samples = [{"text": f"{IMG}{IMG}", "images": [img, img], "p": p} for p in ["a cat", None, "a cat", 5, "a dog"]]
    config = dict(prompt="a photo of", prompt_key="p", gpu_batch_size=3, max_batch_size=10, **FAST)
    with TestPipeline() as p:
        out = p | beam.Create(samples) | CaptionImages(blip_dir, keep_original_sample=False, **config)
        assert_that(out, lambda got: len(got) == 5 or (_ for _ in ()).throw(BeamAssertException(got)))
    assert all(n <= 3 for _, n in calls)
    assert sorted({prompt for prompt, _ in calls}) == ["a cat", "a dog", "a photo of"]
    images_per_prompt = {}
    for prompt, n in calls:
        images_per_prompt[prompt] = images_per_prompt.get(prompt, 0) + n
    assert images_per_prompt == {"a cat": 4, "a photo of": 4, "a dog": 2}


def test_blip_captions_start_with_their_prompt(blip_dir, image_dir):
    """BLIP decodes the prompt as part of the caption (as the reference)."""
    img = str(image_dir / "red.jpg")
    samples = [{"text": IMG, "images": [img], "p": p} for p in ["a cat", None]]
    generated = run_dofn(CaptionConfig(blip_dir, prompt="a photo of", prompt_key="p", **FAST), samples)["generated"]
    assert generated[0]["text"].startswith(f"{IMG} a cat")
    assert generated[1]["text"].startswith(f"{IMG} a photo of")


def test_bad_samples_go_to_failed_and_the_rest_is_intact(blip_dir, image_dir):
    good = samples_for(image_dir)
    bad = [
        {"text": f"{IMG}missing", "images": [str(image_dir / "nope.jpg")]},
        {"text": f"{IMG}{IMG} two tokens", "images": [str(image_dir / "red.jpg")]},
        "not a dict",
    ]
    config = dict(caption_num=2, keep_candidate_mode="all", do_sample=False, gpu_batch_size=4, **FAST)
    clean = run_dofn(CaptionConfig(blip_dir, **config), good, batch_size=len(good))
    expected_good = clean["generated"] + clean["original"]
    expected_failed = [
        {"sample": bad[0], "error": f"image {str(image_dir / 'nope.jpg')!r}: file not found (images[0])"},
        {
            "sample": bad[1],
            "error": f"the text has 2 {IMG} tokens but the sample has only 1 images "
            f"(images=[{str(image_dir / 'red.jpg')!r}])",
        },
        {"sample": bad[2], "error": "the element is a str, not a dict sample"},
    ]
    with TestPipeline() as p:
        result = (
            p | beam.Create(good[:3] + bad + good[3:]) | CaptionImages(blip_dir, **config).with_exception_handling()
        )
        assert_that(result.good, same_elements(expected_good), label="good")
        assert_that(result.failed, equal_to(expected_failed), label="failed")


def test_without_exception_handling_a_bad_sample_fails_the_job_clearly(blip_dir, image_dir):
    with pytest.raises(Exception, match="file not found") as e:
        with TestPipeline() as p:
            _ = p | beam.Create([{"text": IMG, "images": ["/no/such.jpg"]}]) | CaptionImages(blip_dir, **FAST)
    # DirectRunner re-raises the DoFn's SampleError (possibly wrapped): the message tells what to do.
    assert "with_exception_handling" in str(e.value)


def test_inputs_are_not_mutated(blip_dir, image_dir):
    samples = samples_for(image_dir)
    before = copy.deepcopy(samples)
    out = run_dofn(
        CaptionConfig(blip_dir, caption_num=2, keep_candidate_mode="all", **FAST), samples, batch_size=len(samples)
    )
    assert samples == before
    assert all(o is not s for o in out["generated"] for s in samples)
    assert canonical(out["original"]) == canonical(before)


def test_seeded_random_any_is_reproducible(blip_dir, image_dir):
    samples = samples_for(image_dir)[:2] * 4
    config = CaptionConfig(blip_dir, caption_num=4, do_sample=False, seed=11, **FAST)
    first = run_dofn(config, samples, batch_size=8)
    second = run_dofn(config, samples, batch_size=3)
    assert canonical(first["generated"]) == canonical(second["generated"])


def test_metrics_count_right(blip_dir, image_dir):
    samples = samples_for(image_dir) + ["bad"]
    p = TestPipeline()
    result = (
        p
        | beam.Create(samples)
        | CaptionImages(
            blip_dir, caption_num=3, keep_candidate_mode="all", gpu_batch_size=2, **FAST
        ).with_exception_handling()
    )
    assert_that(result.failed, lambda failed: len(failed) == 1 or (_ for _ in ()).throw(BeamAssertException("!")))
    run = p.run()
    run.wait_until_finish()
    counters = {
        m.key.metric.name: m.committed
        for m in run.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))["counters"]
    }
    assert counters["samples_in"] == 7
    assert counters["samples_failed"] == 1
    assert counters["images_captioned"] == 4
    assert counters["captions_generated"] == 12
    assert counters["generated_samples"] == 6
    assert counters["original_samples"] == 6
    assert counters["model_loads"] >= 1
    dists = {
        m.key.metric.name: m.committed
        for m in run.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))["distributions"]
    }
    assert dists["generate_batch_size"].max <= 2
    assert dists["generate_batch_size"].sum == 4
    assert dists["model_load_ms"].count >= 1


def keeps_timestamps_and_windows(actual):
    # actual: (id, kind, timestamp, window start); every output keeps its input's timestamp and window.
    for sample_id, _kind, ts, start in actual:
        if ts != sample_id * 7 or start != (sample_id * 7) // 10 * 10:
            raise BeamAssertException(f"sample {sample_id} came out at {ts} in window [{start}, ...)")
    if len(actual) != 8:
        raise BeamAssertException(f"expected 8 outputs, got {len(actual)}")


def _describe(sample, ts=beam.DoFn.TimestampParam, w=beam.DoFn.WindowParam):
    return sample["id"], "gen" if sample["text"].endswith(EOC) else "orig", float(ts), float(w.start)


def test_timestamps_and_windows_are_kept(blip_dir, image_dir):
    from apache_beam.transforms import window

    def stamp(i):
        sample = {"id": i, "text": IMG, "images": [str(image_dir / "red.jpg")]}
        return window.TimestampedValue(sample, i * 7)

    with TestPipeline() as p:
        out = (
            p
            | beam.Create(range(4))
            | beam.Map(stamp)
            | beam.WindowInto(window.FixedWindows(10))
            | CaptionImages(blip_dir, gpu_batch_size=4, **FAST)
            | beam.Map(_describe)
        )
        assert_that(out, keeps_timestamps_and_windows)


def test_jpegs_are_decoded_in_draft_mode_at_the_model_input_size(blip_dir, tmp_path):
    from PIL import Image

    Image.new("RGB", (640, 480), "red").save(tmp_path / "big.jpg")
    config = CaptionConfig(blip_dir)
    input_size = load_captioner(config).input_size
    assert input_size == 32  # the tiny BLIP's processor size
    work = parse({"text": IMG, "images": [str(tmp_path / "big.jpg")]}, config)
    load_images(work, config, input_size)
    assert work.images[0].size == (80, 60)  # 1/8 scale: the smallest that keeps both sides >= 32


def test_max_input_pixels_downscales_before_the_model(blip_dir, image_dir):
    config = CaptionConfig(blip_dir, max_input_pixels=100)
    work = parse({"text": IMG, "images": [str(image_dir / "red.png")]}, config)
    load_images(work, config, None)
    assert work.images[0].size == (11, 8)  # 48x36 scaled to fit 100 pixels
    out = run_dofn(config, [{"text": IMG, "images": [str(image_dir / "red.png")]}])
    assert len(out["generated"]) == 1


def _tagged(kind):
    def describe(element, ts=beam.DoFn.TimestampParam, w=beam.DoFn.WindowParam):
        sample = element["sample"] if kind == "failed" else element
        is_generated = kind == "good" and sample["text"].endswith(EOC)
        return sample["id"], "generated" if is_generated else kind, float(ts), float(w.start)

    return describe


def test_stream_keeps_timestamps_and_windows_of_every_output(blip_dir, image_dir):
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.test_stream import TestStream
    from apache_beam.transforms import window

    def at(i, ts, image="red.jpg"):
        return window.TimestampedValue({"id": i, "text": IMG, "images": [str(image_dir / image)]}, ts)

    stream = (
        TestStream()
        .add_elements([at(0, 3), at(1, 14, "missing.jpg")])
        .advance_watermark_to(20)
        .add_elements([at(2, 27)])
        .advance_watermark_to_infinity()
    )
    expected = [
        (0, "good", 3.0, 0.0), (0, "generated", 3.0, 0.0), (1, "failed", 14.0, 0.0),
        (2, "good", 27.0, 20.0), (2, "generated", 27.0, 20.0),
    ]  # fmt: skip
    with TestPipeline(options=PipelineOptions(streaming=True)) as p:
        result = (
            p
            | stream
            | beam.WindowInto(window.FixedWindows(20))
            | CaptionImages(blip_dir, **FAST).with_exception_handling()
        )
        good = result.good | "DescribeGood" >> beam.Map(_tagged("good"))
        failed = result.failed | "DescribeFailed" >> beam.Map(_tagged("failed"))
        assert_that((good, failed) | beam.Flatten(), equal_to(expected))
