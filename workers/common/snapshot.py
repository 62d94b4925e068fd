"""The snapshot: what the pool child tells its parent about itself, one typed model written and read through it.

The child writes a :class:`WorkerSnapshot` to a file after every change (:func:`write_snapshot`, atomically); the
parent reads it back (:func:`read_snapshot`) for the heartbeat record and the control commands, so both answer while
a long job keeps the child busy. The control commands' replies are typed here too (:class:`GpuStatusReply`,
:class:`ModelsStatusReply`, :class:`CacheStatusReply`, and :class:`WorkerStatusReply`, all three at once), so
``gpufleet status --control`` reads them through the same models. Nothing else parses these formats.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gpufleet.tasks.fleet import GenerationMetrics, RunningJob

if TYPE_CHECKING:
    from gpufleet.tasks.settings import Settings


class _Wire(BaseModel):
    # Unknown fields are ignored: a reply from a newer worker still reads in an older CLI.
    model_config = ConfigDict(extra="ignore")


class MemoryPoolReport(_Wire):
    """The device budget and what holds it (the memory pool's own report)."""

    device: str = ""
    budget_bytes: int = 0
    resident_bytes: int = 0  # held by models in the cache
    reserved_bytes: int = 0  # reservations: loads in flight, the generation engine's KV cache
    free_bytes: int = 0
    reservations: dict[str, int] = Field(default_factory=dict)
    device_total_bytes: int | None = None
    device_free_bytes: int | None = None
    allocator: dict[str, Any] = Field(default_factory=dict)
    reserved_to_allocated: float | None = None
    alloc_conf: str | None = None
    preallocated_mb: list[int] = Field(default_factory=list)


class DeviceSection(_Wire):
    """Warm-up and memory."""

    warm: bool = False
    warmup: dict[str, Any] | None = None
    memory_pool: MemoryPoolReport = MemoryPoolReport()


class ResidentModel(_Wire):
    """A model on the device."""

    model: str
    bytes: int = Field(ge=0)
    pinned: bool = False
    hits: int = 0  # jobs it served since it was loaded
    last_used_s_ago: float = 0.0
    loaded_s_ago: float = 0.0
    expires_in_s: float | None = None
    load_s: float = 0.0


class ModelUsage(_Wire):
    """One model's lifetime usage on this worker (resident or not)."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    last_load_s: float | None = None
    load_s_total: float = 0.0
    last_used_s_ago: float | None = None
    resident: bool = False


class ModelsSection(_Wire):
    loaded: list[ResidentModel] = Field(default_factory=list)
    usage: dict[str, ModelUsage] = Field(default_factory=dict)


class CacheStats(_Wire):
    """The model cache's counters. ``hits`` and ``misses`` count jobs: a job served by a resident model is a hit,
    one that waited for its model to load (from disk or the parked tier) a miss."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    expirations: int = 0
    unloads: int = 0
    loads: int = 0
    load_s_total: float = 0.0
    entries: int = 0
    pinned: int = 0
    pinned_bytes: int = 0
    used_bytes: int = 0
    capacity_bytes: int = 0
    hit_ratio: float = 0.0


class ParkedModel(_Wire):
    """A model evicted to pinned host memory (the parked tier)."""

    model: str
    bytes: int = Field(ge=0)
    dtype: str | None = None
    from_device: str | None = None
    pinned_memory: bool = False
    parked_for_s: float = 0.0


class ParkedSection(_Wire):
    stats: dict[str, int] = Field(default_factory=dict)
    entries: list[ParkedModel] = Field(default_factory=list)


class CacheSection(_Wire):
    stats: CacheStats = CacheStats()
    idle_ttl_s: float | None = None
    parked: ParkedSection | None = None


class Metrics(_Wire):
    """Counters since the pool child started, for the heartbeat and ``/metrics``."""

    jobs_by_outcome: dict[str, int] = Field(default_factory=dict)  # "task|outcome" -> jobs
    load_s_buckets: dict[str, int] = Field(default_factory=dict)  # cumulative, Prometheus-style, "+Inf" included
    load_s_sum: float = 0.0
    generation: dict[str, GenerationMetrics] = Field(default_factory=dict)  # by model: the decode loop's figures


class WorkerSnapshot(_Wire):
    """The child's state as operators see it."""

    worker: str
    pid: int | None = None
    gpu_type: str | None = None
    device: str | None = None
    ready: bool = False
    ready_at: float | None = None
    dtype: str | None = None
    started_at: float | None = None
    updated_at: float = 0.0
    jobs_done: int = 0
    loader: str | None = None
    preimported_model_code: list[str] = Field(default_factory=list)
    running_job: RunningJob | None = None
    metrics: Metrics = Metrics()
    # None until the child has built its runtime (it publishes "not ready" first).
    gpu: DeviceSection | None = None
    models: ModelsSection = ModelsSection()
    cache: CacheSection | None = None
    # Why there is no real snapshot yet (the parent's stand-in before the child published one).
    state: str | None = None

    def age_s(self, now: float | None = None) -> float:
        """Seconds since the child wrote this snapshot."""
        return round((time.time() if now is None else now) - self.updated_at, 3)


# -- the file ----------------------------------------------------------------------------------------------------


def state_path(settings: Settings, worker_name: str) -> Path:
    """The file a worker's pool child publishes its snapshot to (one per worker name)."""
    base = settings.worker.state_dir or Path(tempfile.gettempdir()) / f"gpufleet-{os.getuid()}"
    base.mkdir(parents=True, exist_ok=True)
    return base / f"{worker_name.replace('/', '_')}.json"


def write_snapshot(snapshot: WorkerSnapshot, path: Path) -> None:
    """Write ``snapshot`` to ``path`` atomically (a reader never sees half a file)."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(snapshot.model_dump_json())
    tmp.replace(path)


def read_snapshot(path: Path, worker_name: str) -> WorkerSnapshot:
    """The last snapshot published at ``path``; a "not ready" stand-in when there is none (yet) or it is unreadable."""
    try:
        return WorkerSnapshot.model_validate_json(path.read_text())
    except (OSError, ValueError, ValidationError):
        return WorkerSnapshot(
            worker=worker_name, ready=False, updated_at=time.time(), state="warming up (no state published yet)"
        )


# -- the control commands' replies -------------------------------------------------------------------------------


class GpuStatusReply(DeviceSection):
    """``gpu_status``: identity, readiness, warm-up and memory of one worker."""

    worker: str
    ready: bool = False
    ready_at: float | None = None
    gpu_type: str | None = None
    device: str | None = None
    queues: list[str] = Field(default_factory=list)
    dtype: str | None = None
    pid: int | None = None
    jobs_done: int = 0
    live_memory: dict[str, int] | None = None  # NVML's view of the worker's GPUs, summed
    age_s: float | None = None


class ModelsStatusReply(ModelsSection):
    """``models_status``: the models resident on one worker, with their usage."""

    worker: str
    ready: bool = False


class CacheStatusReply(CacheSection):
    """``cache_status``: the model cache's counters and the parked tier of one worker."""

    worker: str


class WorkerStatusReply(_Wire):
    """``worker_status``: the three replies above in one answer (what ``gpufleet status --control`` asks)."""

    gpu: GpuStatusReply
    models: ModelsStatusReply
    cache: CacheStatusReply
