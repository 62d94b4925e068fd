"""Remote control commands answered by the worker's parent process, while jobs run.

``gpu_status``, ``models_status`` and ``cache_status`` (and ``worker_status``, all three in one reply) read the
snapshot the pool child publishes (:mod:`gpufleet.workers.common.snapshot`) plus live device memory from NVML, so
they answer even while the child is busy. Each reply is one of the snapshot module's typed replies, as JSON.
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import inspect_command

from gpufleet.workers.common.context import context
from gpufleet.workers.common.snapshot import (
    CacheSection,
    CacheStatusReply,
    DeviceSection,
    GpuStatusReply,
    ModelsStatusReply,
    WorkerSnapshot,
    WorkerStatusReply,
    read_snapshot,
    state_path,
)


def current_snapshot() -> WorkerSnapshot:
    """The last snapshot this worker's child published (parent side); a "not ready" stand-in outside a worker."""
    ctx = context()
    if ctx is None:
        return WorkerSnapshot(worker="?", state="not a gpufleet worker")
    return read_snapshot(state_path(ctx.settings, ctx.identity.name), ctx.identity.name)


def _live_memory() -> dict[str, int] | None:
    """Driver-level memory of this worker's GPUs, summed (NVML: safe in the parent, which has no CUDA context)."""
    ctx = context()
    if ctx is None or not ctx.identity.gpu_indices:
        return None
    from gpufleet.gpu.nvml import device_memory

    try:
        per_gpu = [device_memory(index) for index in ctx.identity.gpu_indices]
    except Exception:  # NVML trouble must not break the status answer
        return None
    return {key: sum(memory[key] for memory in per_gpu) for key in per_gpu[0]}


def gpu_status_reply(snapshot: WorkerSnapshot) -> GpuStatusReply:
    """The ``gpu_status`` answer: identity, readiness, warm-up and memory of this worker."""
    ctx = context()
    identity = ctx.identity if ctx else None
    device = snapshot.gpu or DeviceSection()
    return GpuStatusReply(
        **device.model_dump(),
        worker=snapshot.worker,
        ready=snapshot.ready,
        ready_at=snapshot.ready_at,
        gpu_type=identity.gpu_type if identity else snapshot.gpu_type,
        device=identity.device_label if identity else snapshot.device,
        queues=list(identity.consumed_queues) if identity else [],
        dtype=snapshot.dtype,
        pid=snapshot.pid,
        jobs_done=snapshot.jobs_done,
        live_memory=_live_memory(),
        age_s=snapshot.age_s(),
    )


def models_status_reply(snapshot: WorkerSnapshot) -> ModelsStatusReply:
    """The ``models_status`` answer: the models resident on this worker, with their usage."""
    return ModelsStatusReply(**snapshot.models.model_dump(), worker=snapshot.worker, ready=snapshot.ready)


def cache_status_reply(snapshot: WorkerSnapshot) -> CacheStatusReply:
    """The ``cache_status`` answer: the cache's counters and the parked tier."""
    return CacheStatusReply(**(snapshot.cache or CacheSection()).model_dump(), worker=snapshot.worker)


def gpu_status_payload() -> dict[str, Any]:
    return gpu_status_reply(current_snapshot()).model_dump(mode="json")


@inspect_command()  # type: ignore[untyped-decorator]
def gpu_status(state_: Any) -> dict[str, Any]:
    """Device, warm-up, readiness and memory pool of this worker."""
    return gpu_status_payload()


@inspect_command()  # type: ignore[untyped-decorator]
def models_status(state_: Any) -> dict[str, Any]:
    """Models resident on this worker, with their usage statistics."""
    return models_status_reply(current_snapshot()).model_dump(mode="json")


@inspect_command()  # type: ignore[untyped-decorator]
def cache_status(state_: Any) -> dict[str, Any]:
    """Model cache statistics (hits, misses, evictions) and the parked tier."""
    return cache_status_reply(current_snapshot()).model_dump(mode="json")


@inspect_command()  # type: ignore[untyped-decorator]
def worker_status(state_: Any) -> dict[str, Any]:
    """The three answers above in one reply, from one read of the snapshot."""
    snapshot = current_snapshot()
    reply = WorkerStatusReply(
        gpu=gpu_status_reply(snapshot), models=models_status_reply(snapshot), cache=cache_status_reply(snapshot)
    )
    return reply.model_dump(mode="json")
