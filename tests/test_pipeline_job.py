"""The captioning job (pipelines/caption.py) end to end on files."""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest
from helpers import IMG

from pipelines.caption import input_folder, run


def read_jsonl(prefix: str) -> list:
    rows = []
    for path in sorted(glob.glob(prefix + "*.jsonl")):
        with open(path, encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


@pytest.fixture()
def dataset(tmp_path, image_dir):
    """A JSONL dataset with relative image paths, one bad line and one missing image."""
    shutil.copytree(image_dir, tmp_path / "imgs")
    lines = [
        json.dumps({"id": 1, "text": f"{IMG}a red thing", "images": ["imgs/red.jpg"]}),
        json.dumps({"id": 2, "text": f"{IMG}{IMG}", "images": ["imgs/blue.png", str(tmp_path / "imgs/green.jpg")]}),
        json.dumps({"id": 3, "text": "plain"}),
        json.dumps({"id": 4, "text": f"{IMG}", "images": ["imgs/missing.jpg"]}),
        "{not json",
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_job_writes_captions_and_failures(dataset, blip_dir, capsys):
    out, failed = str(dataset / "out" / "captioned"), str(dataset / "out" / "failed")
    run([
        "--input", str(dataset / "*.jsonl"), "--output", out, "--failed_output", failed,
        "--hf_img2seq", blip_dir, "--max_new_tokens", "4", "--caption_num", "2", "--keep_candidate_mode", "all",
        "--num_shards", "1",
    ])  # fmt: skip
    rows = read_jsonl(out)
    assert sorted(r["id"] for r in rows) == [1, 1, 1, 2, 2, 2, 3]
    generated = [r for r in rows if r["text"].endswith("<|__dj__eoc|>")]
    assert len(generated) == 4 and all(r["images"] for r in generated)
    bad = read_jsonl(failed)
    assert len(bad) == 2
    reasons = sorted(b["error"] for b in bad)
    assert "imgs/missing.jpg" in reasons[0] and "file not found" in reasons[0]
    assert reasons[1].startswith("invalid JSON line")
    summary = json.loads(capsys.readouterr().out.split("beamcap summary:")[1].strip().splitlines()[0])
    assert summary["samples_in"] == 4 and summary["samples_failed"] == 1 and summary["images_captioned"] == 3


def test_job_without_failed_output_fails_clearly(dataset, blip_dir):
    os.remove(dataset / "data.jsonl")
    (dataset / "d.jsonl").write_text(json.dumps({"text": IMG, "images": ["imgs/missing.jpg"]}) + "\n")
    with pytest.raises(Exception, match="file not found"):
        run(
            [
                "--input",
                str(dataset / "d.jsonl"),
                "--output",
                str(dataset / "o"),
                "--hf_img2seq",
                blip_dir,
                "--max_new_tokens",
                "2",
            ]
        )


def test_input_folder():
    assert input_folder("/data/x/*.jsonl") == "/data/x"
    assert input_folder("gs://b/d/part-*/f.jsonl") == "gs://b/d"
    assert input_folder("data.jsonl") == "."
    assert input_folder("/a/b/c.jsonl") == "/a/b"
