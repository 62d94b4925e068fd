"""Fault injection for tests of failure paths (CUDA OOM, crashes) that cannot be provoked on a CPU.

Off unless ``GPUFLEET_FAULTS`` is set to a comma-separated list of:

- ``oom:load|infer:<model or *>:<count>``: raise a device out-of-memory error the first N times that model
  loads (or runs);
- ``crash:load|infer:<model or *>:<count>``: kill the pool child with SIGKILL instead (a poison job);
- ``slow:warmup|load:<seconds>``: make warm-up (or each disk load) take that much longer, to observe a worker
  that is not ready yet or a load in progress.

Used by the integration tests; never set it in production.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field

from gpu.errors import DeviceOutOfMemoryError

ENV = "GPUFLEET_FAULTS"


@dataclass
class Faults:
    """Remaining injected failures, keyed by (stage, model id or '*')."""

    remaining: dict[tuple[str, str], int] = field(default_factory=dict)
    delays_s: dict[str, float] = field(default_factory=dict)
    crashes: dict[tuple[str, str], int] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> Faults:
        remaining: dict[tuple[str, str], int] = {}
        delays_s: dict[str, float] = {}
        crashes: dict[tuple[str, str], int] = {}
        for item in filter(None, (part.strip() for part in os.environ.get(ENV, "").split(","))):
            kind, stage, rest = item.split(":", 2)
            if kind == "slow":
                delays_s[stage] = float(rest)
                continue
            model, _, count = rest.rpartition(":")
            if kind not in ("oom", "crash") or stage not in ("load", "infer"):
                raise ValueError(
                    f"{ENV}: cannot read {item!r}; use oom|crash:load|infer:<model or *>:<count> or slow:warmup:<s>"
                )
            if kind == "crash":
                crashes[(stage, model)] = int(count)
            else:
                remaining[(stage, model)] = int(count)
        return cls(remaining, delays_s, crashes)

    def delay(self, stage: str) -> None:
        """Sleep the injected delay for ``stage``, if any."""
        if self.delays_s.get(stage):
            time.sleep(self.delays_s[stage])

    def check(self, stage: str, model_id: str) -> None:
        """Raise an injected OOM (or kill this process) if one is left for this stage and model."""
        for key in ((stage, model_id), (stage, "*")):
            if self.crashes.get(key, 0) > 0:
                self.crashes[key] -= 1
                os.kill(os.getpid(), signal.SIGKILL)
            if self.remaining.get(key, 0) > 0:
                self.remaining[key] -= 1
                raise DeviceOutOfMemoryError(f"device ran out of memory while {stage}ing {model_id} (injected)")
