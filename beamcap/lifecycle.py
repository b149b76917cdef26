"""How a DoFn gets its model: loaded once per process and shared by its threads, or once per machine.

- Default: one model per worker process, shared by every thread and DoFn
  instance of that process (``apache_beam.utils.shared.Shared``).
- ``large_model`` / ``model_copies=N``: N models per machine, each in its own
  server process, served to every worker process by a proxy
  (``MultiProcessShared``, as RunInference's ``large_model``). A DoFn holds all
  N and uses them in turn, batch by batch, as RunInference does.

The model itself says whether its load has been reported, so a load is
counted once in the metrics however many threads, DoFns or processes share it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

from apache_beam.utils import shared

from beamcap.config import CaptionConfig


class Models:
    """The models a DoFn uses (one, or ``model_copies``), in turn."""

    def __init__(self, captioners: list[Any]):
        self._captioners = captioners
        self._turn = -1
        self.info = captioners[0].info()

    def next(self) -> Any:
        """The model for the next batch (round-robin over the copies)."""
        self._turn = (self._turn + 1) % len(self._captioners)
        return self._captioners[self._turn]

    def claim_load_reports(self) -> list[dict[str, Any]]:
        """The facts of each load no one has reported yet (for the metrics, on the first bundle)."""
        return [c.info() for c in self._captioners if c.claim_load_report()]


class ModelLifecycle:
    """Made on the launcher (it loads nothing there); :meth:`acquire` runs in ``DoFn.setup`` on the worker."""

    def __init__(self, config: CaptionConfig):
        self._config = config
        self._per_process = shared.Shared()  # pickled with the DoFn: its instances in one process share the model

    def tag(self) -> str:
        """What identifies one loaded model: the same settings share it."""
        c = self._config
        return json.dumps([c.hf_img2seq, c.device, c.torch_dtype, c.trust_remote_code, c.shared_image_pass])

    def acquire(self) -> Models:
        from beamcap.model import load_captioner

        load = functools.partial(load_captioner, self._config)
        if not self._config.shares_across_processes:
            return Models([self._per_process.acquire(load, tag=self.tag())])
        from apache_beam.utils.multi_process_shared import MultiProcessShared

        digest = hashlib.sha256(self.tag().encode()).hexdigest()[:16]
        copies = self._config.model_copies or 1
        return Models(
            [MultiProcessShared(load, tag=f"beamcap-{digest}-{i}", always_proxy=True).acquire() for i in range(copies)]
        )
