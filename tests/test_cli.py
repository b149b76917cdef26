"""The command line as users run it: ``beamcap-caption`` in a subprocess, its output, errors and exit status.

Every user mistake is refused before any work, as one line ``beamcap-caption: error: <what> (<what to do>)`` with
exit status 2 and no traceback; a run is quiet but for beamcap's own lines and its summary.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import time

import pytest
from helpers import IMG, printed_summary

from pipelines.options import UserError, beam_option_parser, check_beam_arguments, make_parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(os.path.dirname(sys.executable), "beamcap-caption")


def cli(
    *args: str, cwd: str | None = None, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run the console script as a user would."""
    return subprocess.run(
        [CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def one_line_error(result: subprocess.CompletedProcess, status: int = 2, alone: bool = True) -> str:
    """The error line of a refused run: the last on stderr (with ``alone``, the only one), no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status, (result.returncode, result.stderr[-2000:])
    assert lines and lines[-1].startswith("beamcap-caption: error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and (len(lines) == 1 or not alone), result.stderr[-2000:]
    return lines[-1]


@pytest.fixture(scope="module")
def data(tmp_path_factory, image_dir):
    """A dataset folder: data.jsonl (3 samples with relative image paths) and more.jsonl (1 sample)."""
    root = tmp_path_factory.mktemp("cli")
    os.symlink(image_dir, root / "imgs")
    rows = [
        {"id": 1, "text": f"{IMG}a thing", "images": ["imgs/red.jpg"]},
        {"id": 2, "text": f"{IMG}{IMG}", "images": ["imgs/blue.png", "imgs/green.jpg"]},
        {"id": 3, "text": "plain"},
    ]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "more.jsonl").write_text(json.dumps({"id": 4, "text": IMG, "images": ["imgs/yellow.jpg"]}) + "\n")
    return root


def fast(model: str) -> list[str]:
    return ["--hf_img2seq", model, "--do_sample", "false", "--max_new_tokens", "3", "--num_shards", "1"]


def rows(prefix: str) -> list[dict]:
    out = []
    for path in sorted(glob.glob(prefix + "*.jsonl")):
        with open(path, encoding="utf-8") as f:
            out += [json.loads(line, parse_constant=_strict) for line in f]
    return out


def _strict(name):
    raise AssertionError(f"{name} is not strict JSON")


# --- nothing silently ignored -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--keep_orginal_sample", "false"], "unrecognized argument --keep_orginal_sample; did you mean "
                                             "--keep_original_sample?"),
        (["--caption-num", "3"], "unrecognized argument --caption-num; did you mean --caption_num?"),
        (["stray.jsonl"], "unexpected argument 'stray.jsonl' (quote globs"),
        (["--caption_num", "0"], "--caption_num must be a positive int (>= 1), got 0"),
        (["--caption_num", "two"], "argument --caption_num: invalid int value: 'two'"),
        (["--do_sample", "maybe"], "argument --do_sample: expected true or false, got 'maybe'"),
        (["--keep_candidate_mode", "best"], "argument --keep_candidate_mode: invalid choice: 'best'"),
        (["--direct_num_workers", "x"], "argument --direct_num_workers: invalid int value: 'x'"),
        (["--num_shards", "-1"], "argument --num_shards: expected 0 or more, got -1"),
        (["--hf_img2seq", "./models/blip-base"], "model folder './models/blip-base' does not exist"),
    ],
)  # fmt: skip
def test_mistakes_are_refused_before_any_work_as_one_line(data, tmp_path, extra, message):
    out = tmp_path / "out" / "captioned"
    result = cli("--input", str(data / "data.jsonl"), "--output", str(out), "--hf_img2seq", "beamcap-demo", *extra)
    assert message in one_line_error(result)
    assert not (tmp_path / "out").exists()  # no work was done


def test_every_real_beam_option_still_passes():
    parser = make_parser("beamcap-caption", "")
    check_beam_arguments(parser, [
        "--runner", "PortableRunner", "--job_endpoint=localhost:8099", "--environment_type", "EXTERNAL",
        "--environment_config=localhost:50000", "--direct_num_workers", "2", "--direct_running_mode=multi_processing",
        "--experiments", "a", "--experiment=b", "--streaming", "--no_use_public_ips", "--job-server-timeout", "60",
        "--sdk_container_image", "img", "--setup_file", "./setup.py", "--project", "p", "--flink_master", "h:8081",
    ])  # fmt: skip
    with pytest.raises(UserError, match="unrecognized argument --flink_mastr; did you mean --flink_master"):
        check_beam_arguments(parser, ["--flink_mastr", "h:8081"])


def test_beam_declares_its_options_as_this_check_expects():
    """check_beam_arguments builds Beam's option parser as Beam does (PipelineOptions subclasses); this fails when
    a Beam release changes that, before users meet a refused option."""
    flags = {o for a in beam_option_parser()._actions for o in a.option_strings}
    assert {"--runner", "--job_endpoint", "--experiments", "--experiment", "--save_main_session"} <= flags
    assert len(flags) > 120  # Beam 2.62 declares 146


@pytest.mark.slow
def test_several_inputs_and_an_unquoted_glob_are_all_read(data, blip_dir, tmp_path):
    """The shell expands an unquoted glob into several arguments: all are inputs."""
    out = tmp_path / "captioned"
    result = cli("--input", str(data / "data.jsonl"), str(data / "more.jsonl"), "--output", str(out), *fast(blip_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted({r["id"] for r in rows(str(out))}) == [1, 2, 3, 4]


# --- --help -----------------------------------------------------------------------------------------------------


def test_help_gives_every_flag_a_line_and_its_default():
    result = cli("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "usage: beamcap-caption --input 'data/*.jsonl' --output out/captioned" in text
    from beamcap.config import parameters

    for p in parameters():
        assert re.search(rf"--{p.name} \S+ .*?\(default: [^)]*\)", text), p.name
    assert "(required, unless --recipe gives dataset_path)" in text
    assert "--do_sample {true,false}" in text and "--large_model {true,false}" in text
    assert "(default: cuda when a GPU is visible on the worker, else cpu)" in text
    assert "(default: bfloat16 on CUDA (float16 where bf16 is unsupported); on CPU, bfloat16 where it is faster" in text
    assert "a 15 GB download; Salesforce/blip-image-" in text and "--generate_kwargs JSON" in text


# --- one clear line per user error ------------------------------------------------------------------------------


def test_a_missing_input(tmp_path):
    message = one_line_error(cli("--input", "no/such/*.jsonl", "--output", str(tmp_path / "o"), cwd=str(tmp_path)))
    assert f"no input file matches '{tmp_path}/no/such/*.jsonl'" in message


def test_a_bad_recipe(tmp_path):
    (tmp_path / "r.yaml").write_text("process: [image_captioning_mapper: {caption_num: 2}, other_op: {}]\n")
    message = one_line_error(cli("--recipe", str(tmp_path / "r.yaml")))
    assert "the recipe also has: other_op" in message and "--skip_other_ops" in message
    (tmp_path / "bad.yaml").write_text("process: [\n")
    assert "not valid YAML" in one_line_error(cli("--recipe", str(tmp_path / "bad.yaml")))


@pytest.mark.parametrize(
    "recipe, message",
    [
        ("process: 5\n", "process must be a list of ops, got int 5"),
        (
            "process:\n  - image_captioning_mapper: 5\n",
            "image_captioning_mapper's arguments must be a mapping, got int",
        ),
        ("process:\n  - image_captioning_mapper:\n      hf_img2seq:\n", "hf_img2seq must not be None"),
        ("process:\n  - 1: {}\n", "an op name must be a string, got int 1"),
        ("process:\n  - image_captioning_mapper: {1: 2, foo: 3}\n", "argument names must be strings, got [1]"),
    ],
)
def test_recipe_values_of_the_wrong_type_are_one_line_errors(tmp_path, recipe, message):
    """Refused on the launcher with what to change, never a traceback (they raised TypeError before)."""
    from pipelines.caption import run

    (tmp_path / "in.jsonl").write_text('{"text": "x", "images": []}\n')
    path = tmp_path / "r.yaml"
    path.write_text(f"dataset_path: {tmp_path}/in.jsonl\nexport_path: {tmp_path}/o.jsonl\n" + recipe)
    with pytest.raises(UserError, match=re.escape(message)):
        run(["--recipe", str(path)])


def test_a_num_beams_of_the_wrong_type_is_a_one_line_error(tmp_path):
    from pipelines.caption import run

    (tmp_path / "in.jsonl").write_text('{"text": "x", "images": []}\n')
    argv = ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o"), "--caption_num", "2"]
    with pytest.raises(UserError, match=re.escape("--generate_kwargs num_beams must be a positive int, got '4'")):
        run([*argv, "--generate_kwargs", '{"num_beams": "4"}'])


def test_a_hub_model_that_cannot_be_reached_fails_fast_and_says_what_to_do(data, tmp_path):
    start = time.monotonic()
    args = ["--input", str(data / "data.jsonl"), "--output", str(tmp_path / "o")]
    offline = cli(*args, "--hf_img2seq", "Salesforce/blip-image-captioning-base", env={"HF_HUB_OFFLINE": "1"})
    message = one_line_error(offline)
    assert "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in message
    assert "hf download Salesforce/blip-image-captioning-base --local-dir DIR" in message
    online = cli(*args, env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})  # the default model
    message = one_line_error(online)
    assert "'Salesforce/blip2-opt-2.7b' is neither a local folder nor in the local Hugging Face cache" in message
    assert "HF_HUB_OFFLINE=1" in message and "save_pretrained" in message
    assert time.monotonic() - start < 30  # two runs, each well within 10 s of its own start-up


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_a_cuda_device_on_a_machine_without_one(data, tmp_path):
    args = ["--input", str(data / "data.jsonl"), "--output", str(tmp_path / "o"), "--hf_img2seq", "beamcap-demo"]
    assert "--device cuda: this machine has no CUDA device" in one_line_error(cli(*args, "--device", "cuda"))


@pytest.mark.slow
def test_a_sample_that_stops_the_job_names_its_image_and_the_way_on(data, blip_dir, tmp_path):
    """Without --failed_output, the first failed sample stops the job: one line naming the resolved image path and
    pointing to --failed_output, exit status 1, and no beam-temp-* folders left behind."""
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": IMG, "images": ["imgs/missing.jpg"]}) + "\n")
    os.symlink(data / "imgs", tmp_path / "imgs")
    out = tmp_path / "out" / "captioned"
    result = cli("--input", str(tmp_path / "d.jsonl"), "--output", str(out), *fast(blip_dir))
    message = one_line_error(result, status=1, alone=False)  # after beamcap's own log lines
    assert f"image 'imgs/missing.jpg': file not found ({tmp_path}/imgs/missing.jpg) (images[0])" in message
    assert "use --failed_output PATH" in message
    assert not glob.glob(str(tmp_path / "out" / "beam-temp-*"))


# --- messages for the CLI user, and the summary -------------------------------------------------------------------


@pytest.mark.slow
def test_bad_lines_name_their_file_and_line_and_the_summary_accounts_for_everything(data, blip_dir, tmp_path):
    lines = [
        json.dumps({"id": "ok", "text": IMG, "images": [str(data / "imgs" / "red.jpg")]}).encode(),
        b'{"id": "broken", "text": ',
        b'{"id": "latin-1", "text": "caf\xe9"}',  # not UTF-8
        b'{"id": "surrogate", "text": "\\ud800"}',
        b"NaN",
        b'{"id": "nan", "score": NaN}',
        b"[" * 100_000 + b"]" * 100_000,
        json.dumps({"id": "deep", "text": "x", "extra": json.loads("[" * 300 + "]" * 300)}).encode(),
        b"",  # blank lines are skipped
        json.dumps({"id": "missing", "text": IMG, "images": ["nope.jpg"]}).encode(),
        json.dumps({"id": "long", "text": "x" * 400_000}).encode(),
        b"[" * 900 + b"]" * 900,  # parses, but its failure record would be nested too deeply to write
    ]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out, failed = tmp_path / "captioned", tmp_path / "failed"
    result = cli("--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--failed_output", str(failed),
                 "--max_line_bytes", "300000", *fast(blip_dir))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    good, bad = rows(str(out)), rows(str(failed))  # both strict JSON
    assert sorted(r["id"] for r in good) == ["ok", "ok"]
    reasons = {r["error"].split(": ", 1)[0].rsplit(":", 1)[1]: r for r in bad if r["error"].startswith(str(tmp_path))}
    path = str(tmp_path / "in.jsonl")
    assert sorted(reasons, key=int) == ["2", "3", "4", "5", "6", "7", "8", "11", "12"]
    assert reasons["2"]["error"].startswith(f"{path}:2: invalid JSON: Expecting value (column 26)")
    assert reasons["3"]["error"] == f"{path}:3: not valid UTF-8 (byte 30: b'\\xe9')"
    assert reasons["3"]["sample"] == '{"id": "latin-1", "text": "caf\\xe9"}'  # the bytes escaped
    assert "lone surrogate" in reasons["4"]["error"]
    assert "NaN is not valid in strict JSON" in reasons["5"]["error"] and "NaN" in reasons["6"]["error"]
    assert "nested too deeply to parse" in reasons["7"]["error"]
    assert reasons["8"]["error"].endswith(":8: nested more than 100 levels deep (dicts and lists)")
    assert reasons["8"]["sample"].startswith('{"id": "deep"')  # kept as text, so it can always be written
    assert reasons["11"]["error"].endswith(
        f":11: the line is {len(lines[10])} bytes, over the --max_line_bytes limit of 300000"
    )
    assert reasons["11"]["sample"] == lines[10][:1000].decode() + "..."
    assert "nested more than 100 levels deep" in reasons["12"]["error"]
    by_id = {r["sample"]["id"]: r["error"] for r in bad if isinstance(r["sample"], dict)}
    assert f"file not found ({tmp_path}/nope.jpg)" in by_id["missing"]
    summary = printed_summary(result.stdout)
    assert summary["lines_read"] == 11 and summary["lines_unparseable"] == 9 and summary["samples_in"] == 2
    assert summary["samples_failed"] == 1 and summary["failures_written"] == 10 and summary["records_written"] == 2
    assert summary["lines_read"] == summary["samples_in"] + summary["lines_unparseable"]
    assert summary["failures_written"] == summary["samples_failed"] + summary["lines_unparseable"]


# --- quiet by default ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_is_quiet_and_verbose_brings_the_detail_back(data, blip_dir, tmp_path):
    args = ["--input", str(data / "data.jsonl"), "--output", str(tmp_path / "a"), *fast(blip_dir)]
    quiet = cli(*args)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    noise = ("Converting string literal type hint", "prism", "Prism", "apitools", "Loading weights")
    assert not [n for n in noise if n in quiet.stderr], quiet.stderr[-3000:]
    assert all(line.startswith(("INFO beamcap", "WARNING beamcap")) for line in quiet.stderr.strip().splitlines())
    assert quiet.stdout.startswith("beamcap summary: ")
    verbose = cli(*args[:3], str(tmp_path / "b"), *args[4:], "--verbose")
    assert verbose.returncode == 0 and len(verbose.stderr.splitlines()) > len(quiet.stderr.splitlines())


# --- the README's quickstart, as printed ------------------------------------------------------------------------


@pytest.mark.slow
def test_the_readme_quickstart_prints_what_the_readme_shows(tmp_path):
    """The README's quickstart command (after the install step) run in a copy of the demo data, compared with the
    output block the README shows under it."""
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    quickstart = re.search(r"## Quickstart.*?```bash\n(.*?)```", readme, re.S)[1].strip()
    command = quickstart.split("pip install -r requirements.txt -e . && ", 1)[1]
    shown = re.search(r"It prints:\n\n```\n(.*?)```", readme, re.S)[1]
    os.symlink(os.path.join(REPO, "beamcap"), tmp_path / "beamcap")
    result = subprocess.run(
        command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    printed = [line for line in result.stdout.splitlines() if not line.startswith("beamcap summary:")]
    expected = [line for line in shown.splitlines() if not line.startswith("beamcap summary:")]
    assert sorted(printed) == sorted(expected)
    summary = printed_summary(result.stdout)
    shown_summary = printed_summary(shown)
    timing = ("wall_secs", "images_per_sec")
    assert {k: v for k, v in summary.items() if k not in timing} == {
        k: v for k, v in shown_summary.items() if k not in timing
    }
