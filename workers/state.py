"""The worker's process state and the snapshot operators read: one owner for both.

A worker is two processes. The parent (which never touches CUDA) records who the worker is with
:func:`configure` before the pool forks; the pool child builds the :class:`~gpufleet.workers.runtime.WorkerRuntime` and
registers it with :func:`set_runtime`. The child writes a JSON snapshot of its runtime to a file after every change
(:func:`publish`); the parent's control commands read it back (:func:`read_snapshot`), so they answer while a long
job keeps the child busy. The snapshot's format is defined here and nowhere else.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

    from gpufleet.tasks.settings import Settings
    from gpufleet.workers.identity import WorkerIdentity
    from gpufleet.workers.runtime import WorkerRuntime


@dataclass(frozen=True)
class WorkerContext:
    """What the parent knows before it forks: the Celery app, who the worker is, its settings."""

    app: Celery
    identity: WorkerIdentity
    settings: Settings


_context: WorkerContext | None = None
_runtime: WorkerRuntime | None = None


def configure(app: Celery, identity: WorkerIdentity, settings: Settings) -> WorkerContext:
    """Record the worker's app, identity and settings in the parent, before the pool forks."""
    global _context
    _context = WorkerContext(app, identity, settings)
    return _context


def context() -> WorkerContext | None:
    """This worker's context, or None in a process not started by ``gpufleet worker``."""
    return _context


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


# -- the snapshot -------------------------------------------------------------------------------------------


def state_path(settings: Settings, worker_name: str) -> Path:
    """File a worker's pool child publishes its snapshot to (one per worker name)."""
    base = settings.worker.state_dir or Path(tempfile.gettempdir()) / f"gpufleet-{os.getuid()}"
    base.mkdir(parents=True, exist_ok=True)
    return base / f"{worker_name.replace('/', '_')}.json"


def snapshot(runtime: WorkerRuntime) -> dict[str, Any]:
    """The state operators see, as JSON: identity and readiness, then device, models and cache sections."""
    base: dict[str, Any] = {
        "worker": runtime.identity.name,
        "pid": os.getpid(),
        "gpu_type": runtime.identity.gpu_type,
        "device": runtime.identity.device_label,
        "ready": runtime.ready,
        "ready_at": runtime.ready_at,
        "dtype": runtime.dtype,
        "started_at": runtime.started_at,
        "updated_at": time.time(),
        "jobs_done": runtime.jobs_done,
        "loader": getattr(runtime.loader, "name", type(runtime.loader).__name__),
        "preimported_model_code": runtime.preimported,
        "running_job": runtime.current_job,
        # Counters since this child started, for the heartbeat (workers.heartbeat) and /metrics.
        "metrics": {
            "jobs_by_outcome": dict(runtime.jobs_by_outcome),
            "load_s_buckets": dict(runtime.load_s_buckets),
            "load_s_sum": runtime.load_s_sum,
        },
    }
    if runtime.pool is None or runtime.cache is None or runtime.warmup is None:
        return {**base, "gpu": {}, "models": {}, "cache": {}}
    parked = runtime.parked
    return {
        **base,
        "gpu": {
            "warm": runtime.warmup.is_warm,
            "warmup": runtime.warmup_report,
            "memory_pool": runtime.pool.stats(),
        },
        "models": {"loaded": runtime.cache.entries(), "usage": runtime.cache.usage()},
        "cache": {
            "stats": runtime.cache.stats().to_dict(),
            "idle_ttl_s": runtime.idle_ttl_s,
            "parked": None if parked is None else {"stats": parked.stats(), "entries": parked.entries()},
        },
    }


def publish(runtime: WorkerRuntime, path: Path) -> None:
    """Write the runtime's snapshot to ``path`` atomically (a reader never sees half a file)."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(snapshot(runtime), default=str))
    tmp.replace(path)


def read_snapshot() -> dict[str, Any]:
    """The last snapshot this worker's child published (parent side), with its age in seconds."""
    if _context is None:
        return {"error": "not a gpufleet worker"}
    path = state_path(_context.settings, _context.identity.name)
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {"worker": _context.identity.name, "ready": False, "state": "warming up (no state published yet)"}
    data["age_s"] = round(time.time() - float(data.get("updated_at", time.time())), 3)
    return data
