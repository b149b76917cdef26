"""Where a model runs: the device and dtype resolved on the worker, and out-of-memory errors.

Resolved on the worker, never on the launcher: the machine that builds the
pipeline may have no GPU.
"""

from __future__ import annotations

import torch


def resolve_device(requested: str | None) -> torch.device:
    """``requested``, or ``cuda`` when a GPU is visible, else ``cpu``."""
    if requested is not None:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(
                f"device {requested!r} was asked for, but torch sees no CUDA device on this worker (torch "
                f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}): leave device unset to use the CPU, "
                "or run on GPU workers"
            )
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype | str:
    """The weights' dtype: float32 on CPU, bfloat16 (else float16) on CUDA unless set."""
    if name == "auto":
        return "auto"
    if name is not None:
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a device out-of-memory error (CUDA or otherwise)."""
    oom_type = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(error, oom_type) or (isinstance(error, RuntimeError) and "out of memory" in str(error))


def free_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
