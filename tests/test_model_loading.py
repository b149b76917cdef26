"""Model loading details: image-token alignment, models on Beam filesystems, device and dtype."""

from __future__ import annotations

import json
import os

import apache_beam as beam
import pytest
import torch
from apache_beam.io.localfilesystem import LocalFileSystem
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that
from helpers import IMG, has_counts

from beamcap import CaptionConfig, CaptionImages
from beamcap.devices import resolve_device, resolve_dtype
from beamcap.model import load_captioner
from beamcap.sources import localize_model_folder


def test_image_token_id_comes_from_the_processor(model_dirs, image_dir, tmp_path):
    # A BLIP-2 folder whose config names the wrong image token (the reference hard-codes 50265).
    import shutil

    folder = tmp_path / "blip2"
    shutil.copytree(model_dirs("blip2_opt"), folder)
    config = json.loads((folder / "config.json").read_text())
    right = config["image_token_index"]
    config["image_token_index"] = 50265
    (folder / "config.json").write_text(json.dumps(config))
    captioner = load_captioner(CaptionConfig(str(folder), device="cpu"))
    assert captioner.model.config.image_token_index == right
    sample = {"text": IMG, "images": [str(image_dir / "red.jpg")], "_orig": IMG}
    with TestPipeline() as p:
        out = p | beam.Create([sample]) | CaptionImages(str(folder), max_new_tokens=3, prompt="a photo of")
        assert_that(out, has_counts(1, 1))


def test_model_on_a_beam_filesystem_is_copied_once(blip_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BEAMCAP_MODEL_CACHE", str(tmp_path / "cache"))
    local = localize_model_folder(blip_dir)
    assert sorted(os.listdir(local)) == sorted(os.listdir(blip_dir))
    mtime = os.path.getmtime(os.path.join(local, "config.json"))
    assert localize_model_folder(blip_dir) == local
    assert os.path.getmtime(os.path.join(local, "config.json")) == mtime
    assert [n for n in os.listdir(tmp_path / "cache") if n.startswith(".partial")] == []
    load_captioner(CaptionConfig(local, device="cpu"))


def test_device_and_dtype_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cpu", "cuda")
    assert resolve_dtype(None, torch.device("cpu")) is torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == "auto"


def test_half_precision_inputs_follow_the_model(blip_dir, image_dir):
    from PIL import Image

    captioner = load_captioner(CaptionConfig(blip_dir, device="cpu", torch_dtype="bfloat16"))
    assert captioner.dtype is torch.bfloat16
    inputs = captioner.prepare([Image.open(image_dir / "red.jpg")], "a photo of")
    assert inputs["pixel_values"].dtype is torch.bfloat16 and inputs["input_ids"].dtype is torch.long
    assert len(captioner.caption([Image.open(image_dir / "red.jpg")], None, {"max_new_tokens": 2})[0]) == 1


class PrefixedLocalFileSystem(LocalFileSystem):
    """A Beam filesystem for tests: ``beamcaptest://<local path>``, like a bucket but on local disk."""

    PREFIX = "beamcaptest://"

    @classmethod
    def scheme(cls):
        return "beamcaptest"

    def _local(self, path):
        return path[len(self.PREFIX) :] if path.startswith(self.PREFIX) else path

    def match(self, patterns, limits=None):
        results = super().match([self._local(p) for p in patterns], limits)
        for result in results:
            for metadata in result.metadata_list:
                metadata.path = self.PREFIX + metadata.path
        return results

    def open(self, path, *args, **kwargs):
        return super().open(self._local(path), *args, **kwargs)


def test_hf_img2seq_on_a_beam_filesystem_path(blip_dir, image_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BEAMCAP_MODEL_CACHE", str(tmp_path / "cache"))
    remote = PrefixedLocalFileSystem.PREFIX + blip_dir
    sample = {"text": IMG, "images": [str(image_dir / "red.jpg")], "_orig": IMG}
    with TestPipeline() as p:
        out = p | beam.Create([sample]) | CaptionImages(remote, max_new_tokens=3)
        assert_that(out, has_counts(1, 1))
    (cached,) = os.listdir(tmp_path / "cache")
    assert sorted(os.listdir(tmp_path / "cache" / cached)) == sorted(os.listdir(blip_dir))


@pytest.mark.parametrize(
    "capabilities, flags, fast",
    [
        ({"architecture": "x86_64", "avx512_bf16": True, "amx_bf16": False}, {"avx512_bf16"}, False),  # this machine
        ({"architecture": "x86_64", "avx512_bf16": True, "amx_bf16": True}, {"avx512_bf16", "amx_bf16"}, True),
        ({"architecture": "x86_64", "amx_bf16": True}, {"avx512_bf16"}, False),  # the OS has not enabled AMX
        ({"architecture": "x86_64", "amx_bf16": True}, set(), True),  # no /proc/cpuinfo: the CPU's word
        ({"architecture": "aarch64"}, {"fp", "asimd", "bf16"}, True),
        ({"architecture": "aarch64"}, {"fp", "asimd"}, False),
    ],
    ids=["avx512-bf16-only", "amx", "amx-hidden-by-the-os", "amx-not-linux", "arm-bf16", "arm-without"],
)
def test_bf16_is_the_cpu_default_only_where_it_is_faster(monkeypatch, capabilities, flags, fast):
    from beamcap import devices

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    monkeypatch.setattr(devices, "_linux_cpu_flags", lambda: flags)
    devices.cpu_bf16_is_fast.cache_clear()
    try:
        assert devices.cpu_bf16_is_fast() is fast
        assert resolve_dtype(None, torch.device("cpu")) == (torch.bfloat16 if fast else torch.float32)
        assert resolve_dtype("float32", torch.device("cpu")) == torch.float32  # the reference's numerics, on request
    finally:
        devices.cpu_bf16_is_fast.cache_clear()


def test_this_machine_reads_its_cpu_flags():
    """The detection reads real flags here (Linux): a CPU without AMX-BF16 keeps float32."""
    from beamcap import devices

    flags = devices._linux_cpu_flags()
    assert "fpu" in flags or "fp" in flags
    assert devices.cpu_bf16_is_fast() == ("amx_bf16" in flags)
