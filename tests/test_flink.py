"""beamcap-caption on a real Flink session cluster (separate JVMs on this machine), against DirectRunner.

The cluster is started once for these tests with ``beamcap-flink`` (Java 17 and Maven needed; the jars come from
Maven Central, cached). Without Java or Maven the tests are skipped, unless ``BEAMCAP_REQUIRE_FLINK=1`` (CI sets it)
turns that into a failure.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from helpers import IMG, free_ports, printed_summary

from pipelines import flink_cluster

pytestmark = [pytest.mark.slow, pytest.mark.flink]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
JOB_TIMEOUT = 600


@pytest.fixture(scope="module")
def flink(tmp_path_factory):
    """A running cluster: 1 JobManager, 2 TaskManagers of 2 slots, Beam's job server; its status and options."""
    missing = [tool for tool in ("java", "mvn") if shutil.which(tool) is None]
    if missing:
        if os.environ.get("BEAMCAP_REQUIRE_FLINK") == "1":
            pytest.fail(f"{' and '.join(missing)} not found, and BEAMCAP_REQUIRE_FLINK=1")
        pytest.skip(f"Flink tests need Java and Maven ({', '.join(missing)} not found)")
    run_dir = str(tmp_path_factory.mktemp("flink"))
    ports = dict(zip(["rest", "rpc", "blob", "job", "artifact"], free_ports(5), strict=True))
    flags = ["--run-dir", run_dir, *(f"--{name}-port={port}" for name, port in ports.items())]
    cluster = os.path.join(BIN, "beamcap-flink")
    started = subprocess.run([cluster, "start", *flags], capture_output=True, text=True, timeout=900)
    assert started.returncode == 0, started.stderr[-5000:]
    again = subprocess.run([cluster, "start", *flags], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "started" not in again.stderr, again.stderr  # idempotent: nothing new
    try:
        yield {"flags": flags, "run_dir": run_dir, "rest": ports["rest"], **_status(flags)}
    finally:
        subprocess.run([cluster, "stop", *flags], capture_output=True, timeout=120)
        assert not _status(flags)["running"]


def _status(flags: list[str]) -> dict:
    out = subprocess.run([os.path.join(BIN, "beamcap-flink"), "status", *flags], capture_output=True, text=True)
    return json.loads(out.stdout)


def caption(args: list[str], cwd: str) -> dict:
    """Run beamcap-caption as a user would; its summary."""
    result = subprocess.run(
        [os.path.join(BIN, "beamcap-caption"), *args], cwd=cwd, capture_output=True, text=True, timeout=JOB_TIMEOUT
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return printed_summary(result.stdout)


def lines(pattern: str) -> list[str]:
    found = []
    for path in sorted(glob.glob(pattern)):
        with open(path, encoding="utf-8") as f:
            found += [line for line in f if line.strip()]
    return sorted(found)


def rest(port: int, path: str) -> dict:
    """The JobManager's REST API, with more patience than beamcap-flink's (a TaskManager may be dying)."""
    return flink_cluster.rest(port, path, timeout=10)


def latest_job(port: int) -> str:
    jobs = rest(port, "/jobs/overview")["jobs"]
    return max(jobs, key=lambda job: job["start-time"])["jid"]


def stage_on_taskmanagers(port: int, jid: str, transform: str) -> dict[str, tuple[str, int]]:
    """For the stage that runs ``transform``: each TaskManager's (status, records read), from Flink's REST API."""
    found: dict[str, tuple[str, int]] = {}
    for vertex in rest(port, f"/jobs/{jid}")["vertices"]:
        if transform in vertex["name"]:
            for tm in rest(port, f"/jobs/{jid}/vertices/{vertex['id']}/taskmanagers")["taskmanagers"]:
                found[tm["taskmanager-id"]] = (tm["status"], int(tm["metrics"]["read-records"]))
    return found


def model_loads_in_logs(run_dir: str, since: dict[str, int]) -> dict[str, int]:
    """Model loads beamcap logged in each TaskManager's log (its SDK workers log there) since ``since`` offsets."""
    counts = {}
    for path in glob.glob(os.path.join(run_dir, "logs", "taskmanager-*.log")):
        with open(path, "rb") as f:
            f.seek(since.get(path, 0))
            counts[os.path.basename(path)] = sum(1 for line in f if b"Loaded " in line and b": family " in line)
    return counts


def log_offsets(run_dir: str) -> dict[str, int]:
    return {p: os.path.getsize(p) for p in glob.glob(os.path.join(run_dir, "logs", "taskmanager-*.log"))}


def demo_copy(root) -> str:
    """The demo data and recipe, in a folder of its own (the recipe's paths are relative to it)."""
    shutil.copytree(os.path.join(REPO, "beamcap", "demo", "data"), root / "beamcap" / "demo" / "data")
    return str(root)


def test_the_demo_recipe_gives_directrunners_output_and_each_worker_loads_once(flink, tmp_path):
    """The demo recipe (relative dataset_path and export_path) started in a folder the workers do not run in:
    the same records as on DirectRunner, written where the launcher's paths say."""
    recipe = ["--recipe", "beamcap/demo/data/recipe.yaml", "--do_sample", "false", "--failed_output", "out/failed"]
    local = demo_copy(tmp_path / "local")
    on_flink = demo_copy(tmp_path / "flink")
    direct = caption(recipe, cwd=local)
    offsets = log_offsets(flink["run_dir"])
    summary = caption([*recipe, *flink["options"]], cwd=on_flink)
    assert lines(f"{on_flink}/out/demo/captioned.jsonl") == lines(f"{local}/out/demo/captioned.jsonl")
    assert len(lines(f"{on_flink}/out/demo/captioned.jsonl")) == 7
    assert lines(f"{on_flink}/out/failed*") == lines(f"{local}/out/failed*") == []
    counts = ("lines_read", "samples_in", "samples_failed", "images_captioned", "generated_samples", "records_written")
    assert {k: summary[k] for k in counts} == {k: direct[k] for k in counts}
    loads = model_loads_in_logs(flink["run_dir"], offsets)
    assert set(loads.values()) <= {0, 1} and sum(loads.values()) >= 1, loads  # one load per SDK worker at most
    assert summary["model_loads"] <= sum(loads.values())


def dataset(root, n: int, relative: bool = False) -> str:
    """n one-image samples (the demo pictures in turn), a missing image and a line that is not JSON, in
    ``root/data.jsonl``; with ``relative``, image paths are relative to ``root`` (a copy of the demo data)."""
    pictures = sorted(glob.glob(os.path.join(REPO, "beamcap", "demo", "data", "images", "*.jpg")))
    if relative:
        pictures = [os.path.join("images", os.path.basename(p)) for p in pictures]
    with open(root / "data.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": i, "text": f"{IMG} picture {i}", "images": [pictures[i % len(pictures)]]}) + "\n")
        f.write(json.dumps({"id": "missing", "text": IMG, "images": ["missing.jpg"]}) + "\n")
        f.write("{not json\n")
    return str(root / "data.jsonl")


def test_relative_paths_candidates_failures_and_large_model_give_directrunners_output(flink, tmp_path):
    """The bundled recipe, started in a folder the workers do not run in, on 24 samples whose input, output (the
    recipe's export_path), failed output and image paths are all relative, with caption_num=3 'all', a missing
    image and a bad line, and one model per machine (large_model): outputs, failures and the summary's counts
    equal DirectRunner's, the TaskManagers' logs show one model load in all, and both TaskManagers captioned."""
    args = ["--recipe", "beamcap/demo/data/recipe.yaml", "--input", "beamcap/demo/data/data.jsonl",
            "--failed_output", "out/failed", "--do_sample", "false", "--caption_num", "3",
            "--keep_candidate_mode", "all", "--large_model", "true", "--num_shards", "1"]  # fmt: skip
    runs = {}
    for name in ("local", "flink"):
        runs[name] = demo_copy(tmp_path / name)
        dataset(tmp_path / name / "beamcap" / "demo" / "data", 24, relative=True)
    direct = caption(args, cwd=runs["local"])
    offsets = log_offsets(flink["run_dir"])
    summary = caption([*args, *flink["options"]], cwd=runs["flink"])
    captioned = lines(f"{runs['flink']}/out/demo/captioned*")
    assert captioned == lines(f"{runs['local']}/out/demo/captioned*")
    assert len(captioned) == 24 * (1 + 3)
    failed = {
        name: [line.replace(root, "<run>") for line in lines(f"{root}/out/failed*")] for name, root in runs.items()
    }
    assert failed["flink"] == failed["local"] and len(failed["flink"]) == 2, failed  # paths resolved on the launcher
    for key in ("lines_read", "samples_in", "images_captioned", "samples_failed", "model_loads", "lines_unparseable",
                "generated_samples", "records_written", "failures_written"):  # fmt: skip
        assert summary[key] == direct[key], (key, summary, direct)
    assert summary["model_loads"] == 1  # one model for the machine, shared by both TaskManagers' SDK workers
    assert sum(model_loads_in_logs(flink["run_dir"], offsets).values()) == 1
    spread = stage_on_taskmanagers(flink["rest"], latest_job(flink["rest"]), "CaptionImages")
    assert len([tm for tm, (_, read) in spread.items() if read > 0]) == 2, spread


def test_a_lost_taskmanager_costs_nothing(flink, tmp_path):
    """One TaskManager is killed (its process group: the JVM and its SDK worker) while a job of 600 samples
    captions: Flink restarts the job's work on the slots left, and every sample comes out exactly once."""
    data = dataset(tmp_path, 600)
    args = ["--input", data, "--output", "out/captioned", "--failed_output", "out/failed", "--hf_img2seq",
            "beamcap-demo", "--do_sample", "false", "--seed", "1", *flink["options"]]  # fmt: skip
    killed = {}

    def kill_when_captioning():
        deadline = time.monotonic() + JOB_TIMEOUT
        while time.monotonic() < deadline and not killed:
            try:
                stage = stage_on_taskmanagers(flink["rest"], latest_job(flink["rest"]), "CaptionImages")
            except (OSError, ValueError, KeyError):
                stage = {}
            busy = sorted(tm for tm, (status, read) in stage.items() if status == "RUNNING" and read > 0)
            if busy:
                victim = busy[0]  # a TaskManager in the middle of captioning
                pid = _status(flink["flags"])["components"][f"taskmanager-{victim.split('-')[1]}"]["pid"]
                os.killpg(pid, signal.SIGKILL)
                killed.update(taskmanager=victim, pid=pid)
            time.sleep(0.5)

    killer = threading.Thread(target=kill_when_captioning, daemon=True)
    killer.start()
    summary = caption(args, cwd=str(tmp_path))
    killer.join(timeout=5)
    assert killed, "the job ended before a TaskManager could be killed"
    records = [json.loads(line) for line in lines(f"{tmp_path}/out/captioned*")]
    originals = sorted(r["id"] for r in records if not r["text"].endswith("<|__dj__eoc|>"))
    generated = sorted(r["id"] for r in records if r["text"].endswith("<|__dj__eoc|>"))
    assert originals == generated == list(range(600))  # no loss, no duplicate
    assert len(lines(f"{tmp_path}/out/failed*")) == 2
    assert summary["samples_in"] == 601 and summary["records_written"] == 1200
    exceptions = rest(flink["rest"], f"/jobs/{latest_job(flink['rest'])}/exceptions")
    assert exceptions.get("exceptionHistory", {}).get("entries"), "Flink recorded no failure: nothing was recovered"
    revived = subprocess.run([os.path.join(BIN, "beamcap-flink"), "start", *flink["flags"]], capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert revived.returncode == 0 and f"taskmanager-{killed['taskmanager'].split('-')[1]}" in revived.stderr
