"""The pool child's runtime registry and its snapshot: built from the runtime, written for the parent to read.

The child builds the :class:`~gpufleet.workers.child.runtime.WorkerRuntime` and registers it with
:func:`set_runtime`; task bodies reach it through :func:`runtime`. After every change the runtime publishes
(:func:`publish`) a :class:`~gpufleet.workers.common.snapshot.WorkerSnapshot`, the one format the parent reads.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from gpufleet.tasks.fleet import RunningJob
from gpufleet.workers.common.snapshot import (
    CacheSection,
    CacheStats,
    DeviceSection,
    MemoryPoolReport,
    Metrics,
    ModelsSection,
    ModelUsage,
    ParkedModel,
    ParkedSection,
    ResidentModel,
    WorkerSnapshot,
    write_snapshot,
)

if TYPE_CHECKING:
    from gpufleet.workers.child.runtime import WorkerRuntime

_runtime: WorkerRuntime | None = None


def set_runtime(runtime: WorkerRuntime | None) -> None:
    """Register the pool child's runtime (task bodies reach it through :func:`runtime`)."""
    global _runtime
    _runtime = runtime


def runtime() -> WorkerRuntime:
    """The serving runtime of this pool child.

    Raises:
        RuntimeError: called outside a worker's pool child.
    """
    if _runtime is None:
        raise RuntimeError("no worker runtime in this process: task bodies run only inside `gpufleet worker`")
    return _runtime


def snapshot(runtime: WorkerRuntime) -> WorkerSnapshot:
    """The state operators see: identity and readiness, then device, models and cache sections."""
    job = runtime.current_job
    base = WorkerSnapshot(
        worker=runtime.identity.name,
        pid=os.getpid(),
        gpu_type=runtime.identity.gpu_type,
        device=runtime.identity.device_label,
        ready=runtime.ready,
        ready_at=runtime.ready_at,
        dtype=runtime.dtype,
        started_at=runtime.started_at,
        updated_at=time.time(),
        jobs_done=runtime.jobs_done,
        loader=getattr(runtime.loader, "name", type(runtime.loader).__name__),
        preimported_model_code=list(runtime.preimported),
        running_job=None if job is None else RunningJob.model_validate(job),
        metrics=Metrics(
            jobs_by_outcome=dict(runtime.jobs_by_outcome),
            load_s_buckets=dict(runtime.load_s_buckets),
            load_s_sum=runtime.load_s_sum,
            generation=runtime.generation.report(),
        ),
    )
    if runtime.pool is None or runtime.cache is None or runtime.warmup is None:
        return base
    cache = runtime.cache
    parked = runtime.parked
    resident = [
        ResidentModel(
            model=entry["key"],
            bytes=entry["size_bytes"],
            pinned=entry["pinned"],
            hits=entry["hits"],
            last_used_s_ago=entry["last_used_s_ago"],
            loaded_s_ago=entry["loaded_s_ago"],
            expires_in_s=entry["expires_in_s"],
            load_s=entry["load_s"],
        )
        for entry in cache.entries()
    ]
    parked_section = None
    if parked is not None:
        parked_section = ParkedSection(
            stats=parked.stats(),
            entries=[ParkedModel.model_validate({**e, "model": e["model_id"]}) for e in parked.entries()],
        )
    return base.model_copy(
        update={
            "gpu": DeviceSection(
                warm=runtime.warmup.is_warm,
                warmup=runtime.warmup_report,
                memory_pool=MemoryPoolReport.model_validate(runtime.pool.stats()),
            ),
            "models": ModelsSection(
                loaded=resident,
                usage={key: ModelUsage.model_validate(usage) for key, usage in cache.usage().items()},
            ),
            "cache": CacheSection(
                stats=CacheStats.model_validate(cache.stats().to_dict()),
                idle_ttl_s=runtime.idle_ttl_s,
                parked=parked_section,
            ),
        }
    )


def publish(runtime: WorkerRuntime, path: Path) -> None:
    """Write the runtime's snapshot to ``path`` atomically (a reader never sees half a file)."""
    write_snapshot(snapshot(runtime), path)
