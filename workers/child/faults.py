"""Fault injection for tests of failure paths (device out-of-memory, crashes, slow stages).

Off unless the worker runs with ``GPUFLEET_DIAGNOSTICS=true``; then ``GPUFLEET_FAULTS`` holds a comma-separated
list of:

- ``oom:load|infer:<model or *>:<count>``: make the model's forward raise torch's own out-of-memory error the next
  ``count`` times it runs: for ``load``, the check forward right after the model is loaded (it needs
  ``GPUFLEET_GPU__WARMUP__AFTER_LOAD``, the default); for ``infer``, the job's forward. The error comes out of a
  real forward of the real model, so it travels the same path as a CUDA out-of-memory error: translated by
  :mod:`gpufleet.gpu.runtime`, then the worker's OOM policy;
- ``crash:load|infer:<model or *>:<count>``: kill the pool child with SIGKILL instead (a poison job);
- ``slow:warmup|load:<seconds>``: make warm-up (or each disk load) take that much longer, to observe a worker
  that is not ready yet or a load in progress.

A worker refuses to start with ``GPUFLEET_FAULTS`` set and diagnostics off, so a stray variable can never
kill a production worker.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gpufleet.workers.errors import WorkerStartError

if TYPE_CHECKING:
    from gpufleet.tasks.settings import Settings

ENV = "GPUFLEET_FAULTS"
STAGES = ("load", "infer")


@dataclass
class Faults:
    """Remaining injected failures, keyed by (stage, model id or '*')."""

    ooms: dict[tuple[str, str], int] = field(default_factory=dict)
    delays_s: dict[str, float] = field(default_factory=dict)
    crashes: dict[tuple[str, str], int] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> Faults:
        """The faults ``GPUFLEET_FAULTS`` asks for, when diagnostics are enabled.

        Raises:
            WorkerStartError: faults are asked for while diagnostics are off, or the list cannot be read.
        """
        spec = settings.faults.strip()
        if not spec:
            return cls()
        if not settings.diagnostics:  # the settings refuse this too; a hand-built Settings may not have been read
            raise WorkerStartError(
                f"{ENV} is set but diagnostics are off: fault injection is for tests only. Unset {ENV}, or set "
                "GPUFLEET_DIAGNOSTICS=true on a test worker"
            )
        return cls.parse(spec)

    @classmethod
    def parse(cls, spec: str) -> Faults:
        """Read a ``GPUFLEET_FAULTS`` value.

        Raises:
            WorkerStartError: an item does not follow the documented forms.
        """
        faults = cls()
        for item in filter(None, (part.strip() for part in spec.split(","))):
            kind, stage, rest = [*item.split(":", 2), "", ""][:3]
            try:
                if kind == "slow" and stage in ("warmup", "load"):
                    faults.delays_s[stage] = float(rest)
                    continue
                model, _, count = rest.rpartition(":")
                if kind in ("oom", "crash") and stage in STAGES and model:
                    target = faults.ooms if kind == "oom" else faults.crashes
                    target[(stage, model)] = int(count)
                    continue
            except ValueError:
                pass
            raise WorkerStartError(
                f"{ENV}: cannot read {item!r}; use oom|crash:load|infer:<model or *>:<count> or "
                "slow:warmup|load:<seconds>"
            )
        return faults

    def delay(self, stage: str) -> None:
        """Sleep the injected delay for ``stage``, if any."""
        if self.delays_s.get(stage):
            time.sleep(self.delays_s[stage])

    def check(self, stage: str, model_id: str) -> None:
        """Kill this process if a crash is left for this stage and model (a poison job)."""
        if self._take(self.crashes, stage, model_id):
            os.kill(os.getpid(), signal.SIGKILL)

    def arm(self, stage: str, model_id: str, module: Any) -> None:
        """Make ``module``'s next forward raise a real torch out-of-memory error, if one is left for it."""
        if self._take(self.ooms, stage, model_id):
            from gpufleet.gpu.runtime.oom import inject_oom_on_forward

            inject_oom_on_forward(module, calls=1)

    @staticmethod
    def _take(counts: dict[tuple[str, str], int], stage: str, model_id: str) -> bool:
        for key in ((stage, model_id), (stage, "*")):
            if counts.get(key, 0) > 0:
                counts[key] -= 1
                return True
        return False
