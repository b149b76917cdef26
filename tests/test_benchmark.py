"""A tiny run of the benchmark, so it never rots (no timing is asserted)."""

import pytest

from benchmarks.run import main


@pytest.mark.slow
def test_benchmark_smoke(tmp_path, capsys):
    main(["--smoke", "--prompts", "--cache", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.count("| caption_num=") == 4  # 2 cases in the main table, 2 in the mixed-prompt one
    assert "beamcap/float32 floor" in out and "beamcap/bfloat16 floor" in out and "model loaded 1x" in out
    assert out.count("input share") == 2
    assert "ordered/arrival" in out


def test_gpu_busy_parses_nvidia_smi_lines():
    from benchmarks.gpu_busy import parse_utilization

    assert parse_utilization("37\n[N/A]\n\n 63 \n") == [37.0, 63.0]  # "[N/A]" and blank lines are skipped


def test_gpu_busy_samples_while_the_block_runs(tmp_path, monkeypatch):
    """Against a stand-in nvidia-smi on PATH (this machine has no GPU): samples come back, parsed."""
    import os
    import time

    from benchmarks.gpu_busy import GpuBusy

    script = tmp_path / "nvidia-smi"
    script.write_text("#!/bin/sh\necho 40\necho 60\nexec sleep 30\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with GpuBusy() as busy:
        time.sleep(0.5)
    assert busy.samples == [40.0, 60.0] and busy.mean == 50.0


def test_gpu_busy_without_nvidia_smi_reports_nothing(monkeypatch):
    from benchmarks.gpu_busy import GpuBusy

    monkeypatch.setenv("PATH", "/nonexistent")
    with GpuBusy() as busy:
        pass
    assert busy.samples == [] and busy.mean is None


def test_the_reference_method_runs_its_own_copy_in_its_own_dtype(tmp_path):
    """On a GPU beamcap runs bf16/fp16 while Data-Juicer loads float32: the reference's method gets a float32 copy.
    Where both dtypes match (CPU), it shares beamcap's model."""
    from beamcap import demo_model_path
    from benchmarks.run import Bench, Case, make_images

    paths = make_images(str(tmp_path), 1)
    case = Case(1, 1, 2)
    same = Bench(demo_model_path(), paths, {}, torch_dtype="float32")
    assert same.reference_captioner(case) is same.captioner(case)
    other = Bench(demo_model_path(), paths, {}, torch_dtype="float32", reference_dtype="bfloat16")
    assert other.captioner(case).info()["dtype"] == "float32"
    assert other.reference_captioner(case).info()["dtype"] == "bfloat16"
