"""Where a model runs: the device and dtype resolved on the worker, and out-of-memory errors.

Resolved on the worker, never on the launcher: the machine that builds the
pipeline may have no GPU.
"""

from __future__ import annotations

import functools
import platform

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


def _linux_cpu_flags() -> set[str]:
    """The CPU's flags as the Linux kernel lists them (x86 "flags", Arm "Features"); empty elsewhere."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    flags.update(value.split())
    except OSError:
        pass
    return flags


@functools.cache
def cpu_bf16_is_fast() -> bool:
    """Whether this CPU multiplies bfloat16 matrices faster than float32 ones, so that bf16 is the better default.

    Having bf16 instructions is not enough. On x86, AVX512-BF16 alone made BLIP-base's generate 0.75-1.04x as
    fast as in float32 here (oneDNN's bf16 matrix multiplies ran at 0.54-0.89x); only AMX-BF16's tile units make
    bf16 matrix maths faster. So x86 needs ``amx_bf16`` both from the CPU (``torch.cpu.get_capabilities()``, torch's
    public CPUID reading) and from the OS (Linux lists ``amx_bf16`` in /proc/cpuinfo only once it has enabled the
    tile state; a hypervisor may hide it, as this project's machines do). On Arm, the BF16 extension (BFMMLA) is
    the equivalent (not measured here).
    """
    try:
        capabilities = dict(torch.cpu.get_capabilities())
    except Exception:  # noqa: BLE001 - an older torch, or a CPU it cannot read: decide from the OS's flags alone
        capabilities = {}
    flags = _linux_cpu_flags()
    architecture = str(capabilities.get("architecture") or platform.machine()).lower()
    if architecture in ("x86_64", "amd64", "x86", "i686"):
        cpu_has = capabilities.get("amx_bf16", "amx_bf16" in flags)
        os_has = "amx_bf16" in flags or not flags  # no /proc/cpuinfo (not Linux): trust the CPU
        return bool(cpu_has and os_has)
    if architecture in ("aarch64", "arm64"):
        return bool(capabilities.get("bf16") or capabilities.get("sve_bf16") or flags & {"bf16", "svebf16"})
    return False


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype | str:
    """The weights' dtype unless set: bfloat16 (else float16) on CUDA; on CPU, bfloat16 where the CPU multiplies it
    faster than float32 (:func:`cpu_bf16_is_fast`), else float32 (the reference's numerics)."""
    if name == "auto":
        return "auto"
    if name is not None:
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_bf16_is_fast() else torch.float32


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an out-of-memory error: CUDA's, another device's, or the CPU allocator's (torch's
    "DefaultCPUAllocator: can't allocate memory", Python's MemoryError)."""
    oom_type = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    if isinstance(error, (oom_type, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(s in str(error) for s in ("out of memory", "can't allocate memory"))


def memory_that_ran_out(error: BaseException, device: str) -> str:
    """Where an out-of-memory ``error`` ran out: ``cpu`` for the host allocator's failures (which a GPU job meets
    too, when images or outputs are held on the host), else ``device``."""
    if isinstance(error, MemoryError) or "can't allocate memory" in str(error):
        return "cpu"
    return device


def free_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
