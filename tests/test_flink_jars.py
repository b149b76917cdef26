"""beamcap-flink's Maven cache: a refusal is remembered for a day, then asked again (no cluster, no Maven needed)."""

from __future__ import annotations

import os
import time

import pytest

from pipelines import flink_cluster

RUNNER = [("org.apache.beam", "beam-runners-flink-1.19", "0.0.0-none")]


def test_a_refusal_is_trusted_for_a_day_then_maven_is_asked_again(tmp_path, monkeypatch):
    folder = tmp_path / "jobserver"
    folder.mkdir()
    marker = folder / ".unavailable"
    marker.touch()
    monkeypatch.setenv("PATH", str(tmp_path / "no-maven-here"))  # asking Maven would fail loudly
    assert flink_cluster._maven_classpath(str(folder), RUNNER, str(tmp_path / "repo")) is None
    old = time.time() - flink_cluster.RETRY_UNAVAILABLE_AFTER_S - 60
    os.utime(marker, (old, old))
    with pytest.raises(flink_cluster.ClusterError, match="Maven"):
        flink_cluster._maven_classpath(str(folder), RUNNER, str(tmp_path / "repo"))
