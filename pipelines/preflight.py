"""Checks the job makes on the launcher, before any work: each failure is a :class:`UserError` saying what to do."""

from __future__ import annotations

import os

from apache_beam.io.filesystems import FileSystems

from beamcap.sources import ModelSourceError, check_model_source
from pipelines.options import UserError

LOCAL_RUNNERS = frozenset({"DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner", "FnApiRunner"})


def check_inputs(patterns: list[str]) -> None:
    """Every input path or glob matches at least one file."""
    for pattern in patterns:
        try:
            matches = FileSystems.match([pattern])[0].metadata_list
        except Exception as e:  # noqa: BLE001 - Beam filesystems raise many kinds of errors
            raise UserError(f"cannot list the input {pattern!r}: {e}") from None
        if not matches:
            raise UserError(f"no input file matches {pattern!r} (check the path, and quote globs: 'data/*.jsonl')")
        folders = [m.path for m in matches if os.path.isdir(m.path)]  # Beam's reader would skip them silently
        if folders:
            raise UserError(
                f"the input {folders[0]!r} is a folder (Spark and others write a dataset as one): pass the files in "
                f"it, such as '{folders[0].rstrip('/')}/*.parquet'"
            )


def check_model(hf_img2seq: str) -> None:
    try:
        check_model_source(hf_img2seq)
    except ModelSourceError as e:
        raise UserError(str(e)) from None


def check_device(device: str | None, runner: str | None) -> None:
    """A CUDA device asked for on a local run needs a GPU on this machine (remote workers check their own)."""
    if not device or not device.startswith("cuda") or str(runner).rsplit(".", 1)[-1] not in LOCAL_RUNNERS:
        return
    import torch

    if not torch.cuda.is_available():
        raise UserError(
            f"--device {device}: this machine has no CUDA device that torch can use (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}) (leave --device out to use the CPU, or run on a GPU machine)"
        )
