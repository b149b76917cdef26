"""Runners: the ones beamcap works on, and the one it refuses."""

from __future__ import annotations

import glob
import json

import apache_beam as beam
import pytest
from helpers import IMG

from beamcap import CaptionImages, UnsupportedRunnerError
from pipelines.caption import run


def test_dask_runner_is_refused_before_anything_runs(blip_dir):
    dask_runner = pytest.importorskip("apache_beam.runners.dask.dask_runner")
    pipeline = beam.Pipeline(runner=dask_runner.DaskRunner())
    samples = pipeline | beam.Create([{"text": IMG, "images": []}])
    with pytest.raises(UnsupportedRunnerError, match="tagged outputs of a ParDo are not separated"):
        _ = samples | CaptionImages(blip_dir)


def _rows(prefix):
    rows = []
    for path in sorted(glob.glob(prefix + "-*")):
        rows += [json.loads(line) for line in open(path, encoding="utf-8")]
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))


def test_multi_processing_direct_runner_matches_in_memory(tmp_path, blip_dir, image_dir):
    data = tmp_path / "d.jsonl"
    with open(data, "w") as f:
        for i in range(12):
            colour = ["red", "green", "blue", "yellow"][i % 4]
            f.write(json.dumps({"id": i, "text": f"{IMG}x", "images": [str(image_dir / f"{colour}.jpg")]}) + "\n")
        f.write(json.dumps({"id": "bad", "text": IMG, "images": ["missing.jpg"]}) + "\n")
    common = [
        "--input",
        str(data),
        "--hf_img2seq",
        blip_dir,
        "--do_sample",
        "false",
        "--caption_num",
        "2",
        "--keep_candidate_mode",
        "all",
        "--max_new_tokens",
        "3",
    ]
    run([*common, "--output", str(tmp_path / "mem"), "--failed_output", str(tmp_path / "memf")])
    run(
        [
            *common,
            "--output",
            str(tmp_path / "mp"),
            "--failed_output",
            str(tmp_path / "mpf"),
            "--direct_running_mode=multi_processing",
            "--direct_num_workers=2",
        ]
    )
    assert len(_rows(str(tmp_path / "mem"))) == 36
    assert _rows(str(tmp_path / "mp")) == _rows(str(tmp_path / "mem"))
    assert _rows(str(tmp_path / "mpf")) == _rows(str(tmp_path / "memf")) and len(_rows(str(tmp_path / "mpf"))) == 1
