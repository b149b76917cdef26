"""beamcap-flink's Maven cache: a refusal is remembered for a day, then asked again (no cluster, no Maven needed)."""

from __future__ import annotations

import os
import time

import pytest

from pipelines import flink_cluster

RUNNER = [("org.apache.beam", "beam-runners-flink-1.19", "0.0.0-none")]


def _refused(tmp_path, days_ago: float = 0):
    """A cache folder holding Maven's refusal, given ``days_ago``; the folder and the marker."""
    folder = tmp_path / "jobserver"
    folder.mkdir()
    marker = folder / flink_cluster.UNAVAILABLE
    marker.touch()
    when = time.time() - days_ago * 24 * 3600
    os.utime(marker, (when, when))
    return folder, marker


def test_a_refusal_is_trusted_for_a_day_then_maven_is_asked_again(tmp_path, monkeypatch):
    folder, marker = _refused(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "no-maven-here"))  # asking Maven would fail loudly
    assert flink_cluster._maven_classpath(str(folder), RUNNER, str(tmp_path / "repo")) is None
    old = time.time() - flink_cluster.RETRY_UNAVAILABLE_AFTER_S - 60
    os.utime(marker, (old, old))
    with pytest.raises(flink_cluster.ClusterError, match="Maven"):
        flink_cluster._maven_classpath(str(folder), RUNNER, str(tmp_path / "repo"))


def _fake_maven(tmp_path, monkeypatch, body: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    mvn = bin_dir / "mvn"
    mvn.write_text("#!/bin/sh\n" + body)
    mvn.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")


def test_a_new_refusal_renews_the_marker_and_an_answer_is_read_and_kept(tmp_path, monkeypatch):
    folder, marker = _refused(tmp_path, days_ago=1.01)
    repo = str(tmp_path / "repo")
    _fake_maven(tmp_path, monkeypatch, "exit 1\n")
    assert flink_cluster._maven_classpath(str(folder), RUNNER, repo) is None
    assert time.time() - marker.stat().st_mtime < 60  # asked again, refused again: trusted for another day

    marker.unlink()
    jar = tmp_path / "runner.jar"
    jar.touch()
    # Maven writes the classpath to the file named by -Dmdep.outputFile=...
    _fake_maven(
        tmp_path, monkeypatch, f'for a; do case "$a" in -Dmdep.outputFile=*) echo "{jar}" > "${{a#*=}}";; esac; done\n'
    )
    assert flink_cluster._maven_classpath(str(folder), RUNNER, repo) == [str(jar)]
    _fake_maven(tmp_path, monkeypatch, "exit 1\n")  # the answer is cached: Maven is not asked again
    assert flink_cluster._maven_classpath(str(folder), RUNNER, repo) == [str(jar)]
