"""A tiny run of the benchmark, so it never rots (no timing is asserted)."""

from benchmarks.run import main


def test_benchmark_smoke(tmp_path, capsys):
    main(["--smoke", "--prompts", "--cache", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.count("| caption_num=") == 4  # 2 cases in the main table, 2 in the mixed-prompt one
    assert "beamcap/floor" in out and "model loaded 1x" in out
    assert out.count("input share") == 2 and "prefetch" in out
    assert "ordered/arrival" in out
