"""A tiny run of the benchmark, so it never rots (no timing is asserted)."""

from benchmarks.run import main


def test_benchmark_smoke(tmp_path, capsys):
    main(["--smoke", "--cache", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.count("| caption_num=") == 2
    assert "beamcap/floor" in out and "model loaded 1x" in out
