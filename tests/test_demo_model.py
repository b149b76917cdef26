"""The trained demo captioner: true captions, routed to the right image token."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import sysconfig

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import BeamAssertException, assert_that
from helpers import EOC, IMG, run_dofn
from PIL import Image

from beamcap import CaptionImages, demo_model_path
from beamcap.demo.shapes import COLOURS, SHAPES, Scene, draw_scene, random_scene

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_JOB_FLAGS = ["--hf_img2seq", "beamcap-demo", "--do_sample", "false", "--num_shards", "1"]


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory):
    """12 pictures from the eval generator, named by their scene."""
    root = tmp_path_factory.mktemp("scenes")
    rng = random.Random(5)
    files = {}
    for i, (colour, shape) in enumerate((c, s) for c in COLOURS for s in SHAPES):
        scene = Scene(colour, shape, 1)
        path = root / f"{i:02d}_{colour}_{shape}.jpg"
        draw_scene(scene, rng, "eval").save(path, quality=92)
        files[str(path)] = scene
    return files


def _words(path: str) -> tuple[str, str]:
    _, colour, shape = os.path.basename(path)[:-4].split("_")
    return colour, shape


def captions_follow_their_images(min_right: float):
    """Matcher: caption k (after the k-th image token) names image k's colour and shape.

    Misrouted captions would be right about 1 time in 12 (4 colours x 3 shapes); the model itself is
    right about 99% of the time on eval-style pictures, so ``min_right`` tells routing errors from the model's own.
    """

    def check(actual):
        right = total = 0
        wrong = []
        for sample in actual:
            if sample["text"] == sample["_orig"]:
                continue
            captions = [part.split(EOC)[0].strip() for part in sample["text"].split(IMG)[1:]]
            if len(captions) != len(sample["images"]):
                raise BeamAssertException(f"{len(captions)} captions for {len(sample['images'])} images: {sample}")
            for path, caption in zip(sample["images"], captions, strict=True):
                colour, shape = _words(path)
                ok = colour in caption.split() and any(w.startswith(shape) for w in caption.split())
                right += ok
                total += 1
                if not ok:
                    wrong.append((os.path.basename(path), caption))
        if total == 0 or right / total < min_right:
            raise BeamAssertException(f"{right}/{total} captions describe their own image; wrong: {wrong}")

    return check


def routing_samples(files):
    paths = sorted(files)
    samples = []
    for i in range(0, len(paths), 3):
        a, b, c = paths[i : i + 3]
        samples.append({"text": f"{IMG}one", "images": [a]})
        samples.append({"text": f"{IMG}{IMG} two in a chunk{EOC}", "images": [b, c]})
        samples.append({"text": f"{IMG} first {EOC} words {EOC}{IMG} second {IMG} third", "images": [c, a, b]})
    return [dict(s, _orig=s["text"]) for s in samples]


@pytest.mark.parametrize("gpu_batch_size", [1, 3, 8])
def test_each_caption_describes_its_own_image(scene_files, gpu_batch_size):
    with TestPipeline() as p:
        out = (
            p
            | beam.Create(routing_samples(scene_files))
            | CaptionImages("beamcap-demo", gpu_batch_size=gpu_batch_size, do_sample=False, max_new_tokens=8)
        )
        assert_that(out, captions_follow_their_images(min_right=0.9))


def test_all_mode_and_sampling_still_route_right(scene_files):
    with TestPipeline() as p:
        out = (
            p
            | beam.Create(routing_samples(scene_files)[:6])
            | CaptionImages(
                "beamcap-demo", caption_num=3, keep_candidate_mode="all", seed=0, max_new_tokens=8, gpu_batch_size=4
            )
        )
        assert_that(out, captions_follow_their_images(min_right=0.85))


def test_bundled_demo_data_is_captioned_truthfully(tmp_path):
    import json

    from pipelines.caption import run

    data = os.path.join(os.path.dirname(demo_model_path()), "data")
    run(["--input", os.path.join(data, "samples.jsonl"), "--output", str(tmp_path / "out"), *DEMO_JOB_FLAGS])
    truth = json.load(open(os.path.join(data, "truth.json")))
    inputs = [json.loads(line) for line in open(os.path.join(data, "samples.jsonl"))]
    rows = [json.loads(line) for line in open(next(tmp_path.glob("out*.jsonl")))]
    generated = [r for r in rows if r not in inputs]
    assert len(rows) == 7 and len(generated) == 3
    right = total = 0
    for row in generated:
        captions = [part.split(EOC)[0].strip() for part in row["text"].split(IMG)[1:]]
        for image, caption in zip(row["images"], captions, strict=True):
            total += 1
            right += caption == truth[image]
    assert total == 5 and right >= 4, (right, total)


def _drawn_by_hand(seed: int, size: int, style_of):
    """What make_batch should draw: ``style_of(rng)`` picks each picture's style after its scene."""
    from beamcap.demo import train

    rng = random.Random(seed)
    images, texts = [], []
    for _ in range(size):
        scene = random_scene(rng)
        images.append(draw_scene(scene, rng, style_of(rng)))
        texts.append((rng.choice(train.PROMPTS) + " " if rng.random() < 0.3 else "") + scene.caption)
    return images, texts


def test_training_batches_draw_the_styles_asked_for():
    """Stage 1 ('train', the defaults) draws from the same random stream as the first release, so that it still
    trains that release's model; stage 2 draws 'varied', with 'train' pictures in the share asked for."""
    from beamcap.demo import train

    processor = train.build_processor()

    def share(train_share):  # one draw per picture decides its style
        return lambda rng: "varied" if rng.random() >= train_share else "train"

    cases = [({}, lambda rng: "train")] + [
        ({"style": "varied", "train_share": s} if s else {"style": "varied"}, share(s)) for s in (0.0, 0.5, 1.0)
    ]
    for options, style_of in cases:
        inputs, labels = train.make_batch(processor, random.Random(3), 8, **options)
        images, texts = _drawn_by_hand(3, 8, style_of)
        expected = processor(images=images, text=texts, padding="longest", return_tensors="pt")
        assert inputs["pixel_values"].equal(expected["pixel_values"]), options
        assert inputs["input_ids"].equal(expected["input_ids"]), options
        assert labels.equal(expected["input_ids"].masked_fill(expected["attention_mask"] == 0, -100)), options


def test_masked_prompts_are_left_out_of_the_loss():
    """With mask_prompt, the prompt's words get no label (the model learns to continue a prompt, not to write
    one); the caption's words, the start and the end keep theirs; the pictures and texts are the same."""
    from beamcap.demo import train

    processor = train.build_processor()
    plain_inputs, plain = train.make_batch(processor, random.Random(5), 16, prompt_rate=0.5)
    inputs, masked = train.make_batch(processor, random.Random(5), 16, prompt_rate=0.5, mask_prompt=True)
    assert inputs["input_ids"].equal(plain_inputs["input_ids"])
    prompted = 0
    for ids, plain_row, masked_row in zip(inputs["input_ids"], plain, masked, strict=True):
        words = processor.tokenizer.convert_ids_to_tokens(ids.tolist())
        prompt = next((p.split() for p in train.PROMPTS if words[1:4] == p.split()), [])
        prompted += bool(prompt)
        expected = plain_row.clone()
        expected[1 : 1 + len(prompt)] = -100
        assert masked_row.equal(expected), words
    assert 0 < prompted < 16


def test_the_moving_average_is_what_is_saved(tmp_path):
    """With --ema, the saved weights are the average (they differ from the last step's); without, the last step's."""
    from safetensors.torch import load_file

    from beamcap.demo import train

    common = ["--steps", "3", "--batch_size", "2", "--lr", "0.01"]
    train.main(["--out", str(tmp_path / "plain"), *common])
    train.main(["--out", str(tmp_path / "ema"), "--ema", "0.5", *common])
    train.main(["--out", str(tmp_path / "again"), *common])
    plain, ema, again = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("plain", "ema", "again"))
    assert all(plain[k].equal(again[k]) for k in plain)  # seeded: the same run twice gives the same weights
    assert any(not plain[k].equal(ema[k]) for k in plain)


@pytest.mark.parametrize(
    "flags",
    [["--ema", "1.0"], ["--train_share", "1.5"], ["--train_share", "0.2"], ["--steps", "0"], ["--image_size", "100"]],
)
def test_training_refuses_bad_settings(tmp_path, flags, capsys):
    from beamcap.demo import train

    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path / "m"), *flags])
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_training_script_smoke(tmp_path):
    """The shipped recipe's kinds of stage, a few steps each: from scratch, then from a model on 'harder'
    pictures with masked prompts, a moving average and a larger input (position embeddings interpolated); each
    result loads through beamcap's loading path and captions."""
    from beamcap.config import CaptionConfig
    from beamcap.demo import train
    from beamcap.model import load_captioner

    first, second = str(tmp_path / "one"), str(tmp_path / "two")
    train.main(["--out", first, "--steps", "6", "--batch_size", "4"])
    train.main(
        ["--init", first, "--out", second, "--style", "harder", "--train_share", "0.2", "--ema", "0.9"]
        + ["--steps", "3", "--batch_size", "4", "--image_size", "104", "--mask_prompt"]
    )
    with pytest.raises(ValueError, match="can grow, not shrink"):
        train.main(["--init", first, "--out", str(tmp_path / "smaller"), "--steps", "1", "--image_size", "64"])
    with open(os.path.join(second, "config.json")) as f:
        assert json.load(f)["vision_config"]["image_size"] == 104
    with open(os.path.join(second, "processor_config.json")) as f:
        assert json.load(f)["image_processor"]["size"] == {"height": 104, "width": 104}
    image = draw_scene(Scene("red", "circle", 1), random.Random(0), "varied")
    settings = {"max_new_tokens": 3, "do_sample": True, "num_return_sequences": 2}
    for folder in (first, second):
        assert len(load_captioner(CaptionConfig(folder, device="cpu")).caption([image], None, settings)[0]) == 2


@pytest.mark.slow
def test_staged_sdist_installs_and_runs_the_job_outside_the_repo(tmp_path):
    """What --setup_file stages on Dataflow/Flink: the sdist, installed into a fresh virtualenv
    outside the repo, runs the job on the bundled demo data with 'beamcap-demo'."""
    subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    (sdist,) = (tmp_path / "dist").glob("beamcap-*.tar.gz")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # The dependencies (torch, Beam, transformers) come from this environment through a .pth path entry;
    # that does not run this environment's .pth files, so the repo's editable beamcap stays invisible.
    (site,) = (venv / "lib").glob("python3.*/site-packages")
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([venv / "bin" / "pip", "install", "-q", "--no-deps", str(sdist)], check=True, capture_output=True)
    code = "import beamcap; print(beamcap.demo_model_path())"
    env = {**os.environ, "PYTHONPATH": ""}
    where = subprocess.run(
        [venv / "bin" / "python", "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True, text=True
    ).stdout.strip()
    assert where.startswith(str(venv)), where
    data = os.path.join(os.path.dirname(where), "data", "samples.jsonl")
    subprocess.run(
        [
            venv / "bin" / "beamcap-caption",
            "--input",
            data,
            "--output",
            str(tmp_path / "out"),
            *DEMO_JOB_FLAGS,
        ],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
    )
    rows = open(next(tmp_path.glob("out-*.jsonl"))).read().splitlines()
    assert len(rows) == 7


def test_a_caption_that_runs_on_stops_at_the_models_context(tmp_path, caplog):
    """The demo model's context is 32 positions and max_new_tokens defaults to the reference's 128. On a plain
    colour it can write on ('a red square red red ...'): that caption stops at the context's end, as at
    max_new_tokens, instead of failing its whole call (and its batch-mates) past the last position embedding."""

    from beamcap.config import CaptionConfig

    paths = []
    for name, colour in [("red", (255, 0, 0)), ("blue", (0, 0, 255))]:
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"{name}.png")
        paths.append(str(tmp_path / f"{name}.png"))
    paths.append(os.path.join(os.path.dirname(demo_model_path()), "data", "images", "red_circle.jpg"))
    config = CaptionConfig(demo_model_path(), do_sample=False, gpu_batch_size=3, keep_original_sample=False)
    assert config.max_new_tokens == 128
    with caplog.at_level("WARNING", logger="beamcap.model"):
        out = run_dofn(config, [{"text": IMG, "images": [p]} for p in paths], batch_size=3)
    assert out["failed"] == [] and len(out["generated"]) == 3, out
    captions = [s["text"].removeprefix(IMG).removesuffix(EOC).split() for s in out["generated"]]
    assert max(len(c) for c in captions) > 8  # one of the plain colours does run on (else this tests nothing)
    assert all(len(c) <= 31 for c in captions)
    assert ["a", "red", "circle"] in captions
    assert [r.message for r in caplog.records].count(
        "max_new_tokens=128 is more than the model's context of 32 positions leaves after a 0-token prompt: "
        "captions stop at 31 new tokens."
    ) == 1
