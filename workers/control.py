"""Remote control commands answered by the worker's parent process, while jobs run.

``gpu_status``, ``models_status`` and ``cache_status`` read the snapshot the pool child publishes (see
``workers.runtime``) plus live device memory from NVML, so they answer even while the child is busy.
"""

from __future__ import annotations

import json
import time
from typing import Any

from celery.worker.control import inspect_command

from tasks.settings import get_settings
from workers import process
from workers.runtime import state_path


def _snapshot() -> dict[str, Any]:
    identity = process._identity
    if identity is None:
        return {"error": "not a gpufleet worker"}
    path = state_path(process._settings or get_settings(), identity.name)
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {"worker": identity.name, "ready": False, "state": "warming up (no state published yet)"}
    data["age_s"] = round(time.time() - float(data.get("updated_at", time.time())), 3)
    return data


def _live_memory() -> dict[str, int] | None:
    identity = process._identity
    if identity is None or identity.device_index is None:
        return None
    from gpu.runtime.nvml import device_memory

    try:
        return device_memory(identity.device_index)
    except Exception:  # NVML trouble must not break the status answer
        return None


def gpu_status_payload() -> dict[str, Any]:
    data = _snapshot()
    identity = process._identity
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
def gpu_status(state: Any) -> dict[str, Any]:
    """Device, warm-up, readiness and memory pool of this worker."""
    return gpu_status_payload()


@inspect_command()  # type: ignore[untyped-decorator]
def models_status(state: Any) -> dict[str, Any]:
    """Models resident on this worker, with usage statistics."""
    data = _snapshot()
    return {"worker": data.get("worker"), "ready": data.get("ready", False), **data.get("models", {})}


@inspect_command()  # type: ignore[untyped-decorator]
def cache_status(state: Any) -> dict[str, Any]:
    """Model cache statistics (hits, misses, evictions) and the parked tier."""
    data = _snapshot()
    return {"worker": data.get("worker"), **data.get("cache", {})}
