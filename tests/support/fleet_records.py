"""Fleet registry records for routing tests: a worker's heartbeat record, the models it holds, a snapshot."""

from __future__ import annotations

from typing import Any

from gpufleet.tasks.fleet import FleetSnapshot, HeldModel, WorkerRecord
from gpufleet.tasks.names import gpu_type_queue

NOW = 1_000_000.0
"""The clock the records are read at (their heartbeats are this fresh)."""

GiB = 2**30


def worker(name: str, gpu_type: str = "cpu", **fields: Any) -> WorkerRecord:
    """A ready worker of ``gpu_type`` with an 8 GiB budget, heartbeating at :data:`NOW`; ``fields`` override."""
    type_queue = gpu_type_queue(gpu_type)
    base: dict[str, Any] = {
        "name": name,
        "host": "box",
        "pid": 1,
        "gpu_type": gpu_type,
        "device": gpu_type,
        "type_queue": type_queue,
        "direct_queue": f"{type_queue}.{name}",
        "memory_budget_bytes": 8 * GiB,
        "ready": True,
        "heartbeat_at": NOW,
        "ttl_s": 10.0,
    }
    return WorkerRecord.model_validate({**base, **fields})


def held(model: str, n_bytes: int = GiB, *, pinned: bool = False) -> tuple[HeldModel, ...]:
    """One held model, for a record's ``resident`` or ``parked``."""
    return (HeldModel(model=model, bytes=n_bytes, pinned=pinned),)


def fleet(*workers: WorkerRecord, at: float = NOW) -> FleetSnapshot:
    """The snapshot a router reads: these workers, read at ``at``."""
    return FleetSnapshot(workers=workers, read_at=at)
