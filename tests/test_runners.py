"""Runners: the ones beamcap works on, and the one it refuses."""

from __future__ import annotations

import glob
import json

import apache_beam as beam
import pytest
from helpers import IMG, free_ports, printed_summary

from beamcap import CaptionImages, UnsupportedRunnerError
from pipelines.caption import run


def test_dask_runner_is_refused_before_anything_runs(blip_dir):
    from apache_beam.runners.dask import dask_runner

    pipeline = beam.Pipeline(runner=dask_runner.DaskRunner())
    samples = pipeline | beam.Create([{"text": IMG, "images": []}])
    with pytest.raises(UnsupportedRunnerError, match="tagged outputs of a ParDo are not separated"):
        _ = samples | CaptionImages(blip_dir)


def _rows(prefix):
    rows = []
    for path in sorted(glob.glob(prefix + "-*")):
        rows += [json.loads(line) for line in open(path, encoding="utf-8")]
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))


def write_dataset(path, image_dir, n: int, bad: bool) -> str:
    """A JSONL dataset of n one-image samples (colours cycling) and, with ``bad``, one missing image."""
    colours = ["red", "green", "blue", "yellow"]
    with open(path, "w") as f:
        for i in range(n):
            image = str(image_dir / f"{colours[i % 4]}.jpg")
            f.write(json.dumps({"id": i, "text": f"{IMG}x", "images": [image]}) + "\n")
        if bad:
            f.write(json.dumps({"id": "bad", "text": IMG, "images": ["missing.jpg"]}) + "\n")
    return str(path)


def job_args(data: str, model: str, *extra: str) -> list[str]:
    """Flags shared by the runner tests: greedy, short captions."""
    return ["--input", data, "--hf_img2seq", model, "--do_sample", "false", "--max_new_tokens", "3", *extra]


@pytest.mark.slow
def test_multi_processing_direct_runner_matches_in_memory_per_process_and_with_one_large_model(
    tmp_path, blip_dir, image_dir, capsys
):
    """DirectRunner's multi_processing mode (2 worker processes) writes what in_memory writes, with a model per
    process and with one model for the machine (--large_model: one load in all)."""
    data = write_dataset(tmp_path / "d.jsonl", image_dir, 12, bad=True)
    common = job_args(data, blip_dir, "--caption_num", "2", "--keep_candidate_mode", "all", "--gpu_batch_size", "2")
    processes = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
    runs = {"mem": [], "mp": processes, "shared": [*processes, "--large_model", "true"]}
    summaries = {}
    for name, extra in runs.items():
        run([*common, "--output", str(tmp_path / name), "--failed_output", str(tmp_path / f"{name}f"), *extra])
        summaries[name] = printed_summary(capsys.readouterr().out)
    assert len(_rows(str(tmp_path / "mem"))) == 36
    assert len(_rows(str(tmp_path / "memf"))) == 1
    for name in ("mp", "shared"):
        assert _rows(str(tmp_path / name)) == _rows(str(tmp_path / "mem")), name
        assert _rows(str(tmp_path / f"{name}f")) == _rows(str(tmp_path / "memf")), name
    assert summaries["shared"]["model_loads"] == 1


@pytest.fixture()
def portable_services(tmp_path_factory):
    """Beam's job service and an EXTERNAL SDK worker pool on loopback (what Flink/Spark/Dataflow v2 run), started
    in a folder of their own, as workers on a cluster are."""
    import os
    import subprocess
    import sys
    import time

    job_port, pool_port = free_ports(2)
    workers = str(tmp_path_factory.mktemp("workers"))
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    procs = [
        subprocess.Popen([sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
                          "--port", str(job_port)], env=env, cwd=workers, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                          f"--service_port={pool_port}"], env=env, cwd=workers, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL),
    ]  # fmt: skip
    import socket

    deadline = time.time() + 60
    for port in (job_port, pool_port):
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("portable services did not start") from None
                time.sleep(0.2)
    yield job_port, pool_port, workers
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.slow
def test_portable_runner_with_external_workers_matches_direct(tmp_path, blip_dir, image_dir, portable_services):
    job_port, pool_port, _ = portable_services
    data = write_dataset(tmp_path / "d.jsonl", image_dir, 3, bad=True)
    common = job_args(data, blip_dir, "--caption_num", "2", "--keep_candidate_mode", "all")
    run([*common, "--output", str(tmp_path / "direct"), "--failed_output", str(tmp_path / "directf")])
    portable = [
        *common,
        "--output",
        str(tmp_path / "port"),
        "--failed_output",
        str(tmp_path / "portf"),
        "--runner=PortableRunner",
        f"--job_endpoint=localhost:{job_port}",
        "--environment_type=EXTERNAL",
        f"--environment_config=localhost:{pool_port}",
    ]
    _run_within(portable, 240)
    assert len(_rows(str(tmp_path / "direct"))) == 9
    assert _rows(str(tmp_path / "port")) == _rows(str(tmp_path / "direct"))
    assert _rows(str(tmp_path / "portf")) == _rows(str(tmp_path / "directf"))


def _run_within(argv: list[str], seconds: float) -> None:
    """The job, failing the test if it does not end in time (a portable job whose workers die waits for ever)."""
    import threading

    errors = []

    def job():
        try:
            run(argv)
        except Exception as e:  # surfaced by the test thread
            errors.append(repr(e))

    worker = threading.Thread(target=job, daemon=True)
    worker.start()
    worker.join(timeout=seconds)
    assert not worker.is_alive(), f"the portable job did not finish in {seconds} s"
    assert not errors, errors


@pytest.mark.slow
def test_relative_paths_are_resolved_on_the_launcher(tmp_path, blip_dir, image_dir, portable_services, monkeypatch):
    """Workers run in another folder than the launcher (as on every cluster): relative --input, --output and
    --failed_output, and image paths relative to the dataset, still read and write the launcher's files."""
    import shutil

    job_port, pool_port, workers = portable_services
    launcher = tmp_path / "launcher"
    shutil.copytree(image_dir, launcher / "data" / "imgs")
    rows = [{"id": i, "text": f"{IMG}x", "images": [f"imgs/{c}.jpg"]} for i, c in enumerate(["red", "blue"])]
    rows.append({"id": "bad", "text": IMG, "images": ["imgs/missing.jpg"]})
    (launcher / "data" / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(launcher)
    _run_within(
        [*job_args("data/d.jsonl", blip_dir), "--output", "out/captioned", "--failed_output", "out/failed",
         "--runner=PortableRunner", f"--job_endpoint=localhost:{job_port}", "--environment_type=EXTERNAL",
         f"--environment_config=localhost:{pool_port}"],
        240,
    )  # fmt: skip
    assert len(_rows(str(launcher / "out" / "captioned"))) == 4
    (failure,) = _rows(str(launcher / "out" / "failed"))
    assert f"file not found ({launcher}/data/imgs/missing.jpg)" in failure["error"]
    assert not glob.glob(f"{workers}/**/*captioned*", recursive=True)  # nothing written in the workers' folder


def test_large_model_in_memory(blip_dir, image_dir):
    from helpers import run_dofn

    from beamcap import CaptionConfig

    samples = [{"text": IMG, "images": [str(image_dir / "red.jpg")]}]
    shared = run_dofn(CaptionConfig(blip_dir, large_model=True, do_sample=False, max_new_tokens=3), samples)
    local = run_dofn(CaptionConfig(blip_dir, do_sample=False, max_new_tokens=3), samples)
    assert shared == local


def test_model_copies_are_used_in_turn_batch_by_batch(blip_dir, image_dir, tmp_path):
    """model_copies=2: two models per machine, each in its own server process; a DoFn holds both and uses them in
    turn, as RunInference does, and each load is counted once."""
    import shutil

    from helpers import process

    from beamcap import CaptionConfig
    from beamcap.dofn import CaptionDoFn

    # A folder of its own: servers started by other tests in this process for blip_dir would already have
    # reported their loads.
    model_dir = shutil.copytree(blip_dir, tmp_path / "blip")
    config = CaptionConfig(str(model_dir), model_copies=2, do_sample=False, max_new_tokens=3)
    dofn = CaptionDoFn(config, handle_failures=True)
    dofn.setup()
    copies = [dofn._models.next() for _ in range(4)]
    assert copies[0] is copies[2] and copies[1] is copies[3] and copies[0] is not copies[1]
    assert len(dofn._models.claim_load_reports()) == 2 and dofn._models.claim_load_reports() == []
    samples = [{"text": IMG, "images": [str(image_dir / "red.jpg")]}]
    assert process(dofn, config, samples)["generated"] == process(dofn, config, samples)["generated"]
