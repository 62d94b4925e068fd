"""Remote control commands answered by the worker's parent process, while jobs run.

``gpu_status``, ``models_status`` and ``cache_status`` read the snapshot the pool child publishes
(:mod:`gpufleet.workers.state`) plus live device memory from NVML, so they answer even while the child is busy.
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import inspect_command

from gpufleet.workers import state


def _live_memory() -> dict[str, int] | None:
    """Driver-level memory of this worker's GPUs, summed (NVML: safe in the parent, which has no CUDA context)."""
    context = state.context()
    if context is None or not context.identity.gpu_indices:
        return None
    from gpufleet.gpu.runtime.nvml import device_memory

    try:
        per_gpu = [device_memory(index) for index in context.identity.gpu_indices]
    except Exception:  # NVML trouble must not break the status answer
        return None
    return {key: sum(memory[key] for memory in per_gpu) for key in per_gpu[0]}


def gpu_status_payload() -> dict[str, Any]:
    """The ``gpu_status`` answer: identity, readiness, warm-up and memory of this worker."""
    data = state.read_snapshot()
    context = state.context()
    identity = context.identity if context else None
    return {
        "worker": data.get("worker"),
        "ready": data.get("ready", False),
        "ready_at": data.get("ready_at"),
        "gpu_type": identity.gpu_type if identity else None,
        "device": identity.device_label if identity else None,
        "queues": list(identity.queues) if identity else [],
        "dtype": data.get("dtype"),
        "pid": data.get("pid"),
        "jobs_done": data.get("jobs_done", 0),
        "live_memory": _live_memory(),
        "age_s": data.get("age_s"),
        **data.get("gpu", {}),
    }


@inspect_command()  # type: ignore[untyped-decorator]
def gpu_status(state_: Any) -> dict[str, Any]:
    """Device, warm-up, readiness and memory pool of this worker."""
    return gpu_status_payload()


@inspect_command()  # type: ignore[untyped-decorator]
def models_status(state_: Any) -> dict[str, Any]:
    """Models resident on this worker, with their usage statistics."""
    data = state.read_snapshot()
    return {"worker": data.get("worker"), "ready": data.get("ready", False), **data.get("models", {})}


@inspect_command()  # type: ignore[untyped-decorator]
def cache_status(state_: Any) -> dict[str, Any]:
    """Model cache statistics (hits, misses, evictions) and the parked tier."""
    data = state.read_snapshot()
    return {"worker": data.get("worker"), **data.get("cache", {})}
