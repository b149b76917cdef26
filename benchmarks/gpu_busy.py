"""How busy the GPU is while a block runs: ``nvidia-smi`` sampled every 100 ms.

Used by the benchmark on GPU machines; where there is no ``nvidia-smi`` (CPU
machines), nothing is sampled and ``mean`` is None.
"""

from __future__ import annotations

import shutil
import subprocess
from types import TracebackType


def parse_utilization(text: str) -> list[float]:
    """Percentages from ``nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits`` lines."""
    values = []
    for line in text.splitlines():
        line = line.strip()
        try:
            values.append(float(line))
        except ValueError:
            continue  # blank lines, "[N/A]", a line cut by termination
    return values


class GpuBusy:
    """``with GpuBusy(device_index) as busy: ...``, then ``busy.mean`` (percent) and ``busy.samples``."""

    def __init__(self, device_index: int = 0, interval_ms: int = 100):
        self._command = [
            "nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
            f"--id={device_index}", f"-lms={interval_ms}",
        ]  # fmt: skip
        self._process: subprocess.Popen | None = None
        self.samples: list[float] = []

    def __enter__(self) -> GpuBusy:
        if shutil.which(self._command[0]):
            self._process = subprocess.Popen(
                self._command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._process is not None:
            self._process.terminate()
            out, _ = self._process.communicate(timeout=10)
            self.samples = parse_utilization(out)

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None
