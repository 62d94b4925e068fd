"""The API's answers, as pydantic models built from one :class:`FleetSnapshot` (so ``/openapi.json`` is the contract).

Pure functions: no Redis, no clock of their own (ages are measured against the snapshot's ``read_at``). Every
status answer has a fleet-wide part and a per-worker breakdown keyed by worker name, like ``gpufleet status --json``.
Only live workers (within their heartbeat TTL at ``read_at``) are shown.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from gpufleet.tasks.fleet import FleetSnapshot, HeldModel, RunningJob, WorkerRecord
from gpufleet.tasks.names import is_cpu_queue


class _View(BaseModel):
    model_config = ConfigDict(frozen=True)


def hit_rate(hits: int, misses: int) -> float | None:
    """Share of model requests the cache answered, or None before the first request."""
    total = hits + misses
    return hits / total if total else None


# -- /gpu/status ---------------------------------------------------------------------------------------------


class MemoryFigures(_View):
    """Device memory in bytes: the device(s), what models may fill, what resident models hold."""

    total_bytes: int = 0
    budget_bytes: int = 0
    used_bytes: int = 0
    free_budget_bytes: int = 0
    # Reserved by running decode loops for their KV caches (out of the budget; "kv:<model>" on the worker).
    kv_reserved_bytes: int = 0

    @classmethod
    def of(cls, workers: Iterable[WorkerRecord]) -> MemoryFigures:
        """The sum over ``workers``; a host's memory once, however many CPU workers share it."""
        listed = list(workers)
        gpu_total = sum(w.memory_total_bytes for w in listed if not is_cpu_queue(w.type_queue))
        # CPU workers on one host each report the host's whole memory: summing them would count it twice.
        host_total = {w.host: w.memory_total_bytes for w in listed if is_cpu_queue(w.type_queue)}
        return cls(
            total_bytes=gpu_total + sum(host_total.values()),
            budget_bytes=sum(w.memory_budget_bytes for w in listed),
            used_bytes=sum(w.memory_used_bytes for w in listed),
            free_budget_bytes=sum(w.free_budget_bytes for w in listed),
            kv_reserved_bytes=sum(g.kv_reserved_bytes for w in listed for g in w.generation.values()),
        )


class WorkerGpu(_View):
    """One worker's device, readiness and load."""

    host: str
    gpu_type: str
    device: str
    gpu_indices: tuple[int, ...]
    gpu_count: int
    type_queue: str
    direct_queue: str
    ready: bool
    warm: bool
    memory: MemoryFigures
    running_job: RunningJob | None
    backlog: int
    jobs_done: int
    heartbeat_age_s: float
    versions: dict[str, str]


class GpuTypeSummary(_View):
    """Live workers of one GPU type."""

    workers: int
    ready: int
    gpus: int
    memory: MemoryFigures


class FleetGpu(_View):
    """The whole live fleet's devices."""

    workers: int
    ready: int
    gpus: int
    memory: MemoryFigures
    by_gpu_type: dict[str, GpuTypeSummary]


class GpuStatus(_View):
    """``GET /gpu/status``."""

    read_at: float
    fleet: FleetGpu
    workers: dict[str, WorkerGpu]


def _gpus(workers: Iterable[WorkerRecord]) -> int:
    # A CPU worker owns no GPU indices: it counts as no GPU, not as one.
    return sum(len(w.gpu_indices) for w in workers)


def gpu_status(snapshot: FleetSnapshot) -> GpuStatus:
    """Devices, memory and readiness of every live worker, summed fleet-wide and per GPU type."""
    live = snapshot.live()
    by_type: dict[str, list[WorkerRecord]] = {}
    for worker in live:
        by_type.setdefault(worker.gpu_type, []).append(worker)
    return GpuStatus(
        read_at=snapshot.read_at,
        fleet=FleetGpu(
            workers=len(live),
            ready=sum(w.ready for w in live),
            gpus=_gpus(live),
            memory=MemoryFigures.of(live),
            by_gpu_type={
                gpu_type: GpuTypeSummary(
                    workers=len(group),
                    ready=sum(w.ready for w in group),
                    gpus=_gpus(group),
                    memory=MemoryFigures.of(group),
                )
                for gpu_type, group in sorted(by_type.items())
            },
        ),
        workers={
            w.name: WorkerGpu(
                host=w.host,
                gpu_type=w.gpu_type,
                device=w.device,
                gpu_indices=w.gpu_indices,
                gpu_count=w.gpu_count,
                type_queue=w.type_queue,
                direct_queue=w.direct_queue,
                ready=w.ready,
                warm=w.warm,
                memory=MemoryFigures.of([w]),
                running_job=w.running_job,
                backlog=w.backlog,
                jobs_done=w.jobs_done,
                heartbeat_age_s=max(0.0, snapshot.read_at - w.heartbeat_at),
                versions=w.versions,
            )
            for w in live
        },
    )


# -- /models/status ------------------------------------------------------------------------------------------


class ModelPlacement(_View):
    """Where one model is held across the fleet."""

    model: str
    resident_on: list[str]
    parked_on: list[str]
    pinned_on: list[str]
    resident_bytes: int = Field(description="summed over the workers it is resident on")
    parked_bytes: int = Field(description="summed over the workers it is parked on")


class WorkerModels(_View):
    """The models one worker holds."""

    gpu_type: str
    ready: bool
    resident: tuple[HeldModel, ...]
    parked: tuple[HeldModel, ...]
    resident_bytes: int
    parked_bytes: int
    memory_budget_bytes: int


class ModelsStatus(_View):
    """``GET /models/status``."""

    read_at: float
    models: list[ModelPlacement]
    workers: dict[str, WorkerModels]


def models_status(snapshot: FleetSnapshot) -> ModelsStatus:
    """Every model held anywhere in the live fleet (resident or parked, and where), and each worker's models."""
    live = snapshot.live()
    placements: dict[str, _Placement] = {}
    for worker in live:
        for held in worker.resident:
            placements.setdefault(held.model, _Placement()).add(worker.name, held, resident=True)
        for held in worker.parked:
            placements.setdefault(held.model, _Placement()).add(worker.name, held, resident=False)
    return ModelsStatus(
        read_at=snapshot.read_at,
        models=[
            ModelPlacement(
                model=model,
                resident_on=p.resident_on,
                parked_on=p.parked_on,
                pinned_on=p.pinned_on,
                resident_bytes=p.resident_bytes,
                parked_bytes=p.parked_bytes,
            )
            for model, p in sorted(placements.items())
        ],
        workers={
            w.name: WorkerModels(
                gpu_type=w.gpu_type,
                ready=w.ready,
                resident=w.resident,
                parked=w.parked,
                resident_bytes=sum(m.bytes for m in w.resident),
                parked_bytes=sum(m.bytes for m in w.parked),
                memory_budget_bytes=w.memory_budget_bytes,
            )
            for w in live
        },
    )


@dataclass
class _Placement:
    """Where one model was seen so far, while :func:`models_status` walks the fleet."""

    resident_on: list[str] = field(default_factory=list)
    parked_on: list[str] = field(default_factory=list)
    pinned_on: list[str] = field(default_factory=list)
    resident_bytes: int = 0
    parked_bytes: int = 0

    def add(self, worker: str, held: HeldModel, *, resident: bool) -> None:
        if resident:
            self.resident_on.append(worker)
            self.resident_bytes += held.bytes
        else:
            self.parked_on.append(worker)
            self.parked_bytes += held.bytes
        if held.pinned:
            self.pinned_on.append(worker)


# -- /cache/status -------------------------------------------------------------------------------------------


class CacheFigures(_View):
    """Model-cache counters (cumulative since each worker's pool child started) and what is held."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    hit_rate: float | None = Field(default=None, description="hits / (hits + misses); null before any request")
    resident_models: int = 0
    resident_bytes: int = 0
    parked_models: int = 0
    parked_bytes: int = 0

    @classmethod
    def of(cls, workers: Iterable[WorkerRecord]) -> CacheFigures:
        """The sum over ``workers`` (the hit rate of the summed counters)."""
        listed = list(workers)
        hits = sum(w.cache_hits for w in listed)
        misses = sum(w.cache_misses for w in listed)
        return cls(
            hits=hits,
            misses=misses,
            evictions=sum(w.cache_evictions for w in listed),
            hit_rate=hit_rate(hits, misses),
            resident_models=sum(len(w.resident) for w in listed),
            resident_bytes=sum(m.bytes for w in listed for m in w.resident),
            parked_models=sum(len(w.parked) for w in listed),
            parked_bytes=sum(m.bytes for w in listed for m in w.parked),
        )


class CacheStatus(_View):
    """``GET /cache/status``."""

    read_at: float
    fleet: CacheFigures
    workers: dict[str, CacheFigures]


def cache_status(snapshot: FleetSnapshot) -> CacheStatus:
    """Cache hits, misses, evictions and held bytes, fleet-wide and per worker."""
    live = snapshot.live()
    return CacheStatus(
        read_at=snapshot.read_at,
        fleet=CacheFigures.of(live),
        workers={w.name: CacheFigures.of([w]) for w in live},
    )


# -- /workers ------------------------------------------------------------------------------------------------


class WorkerView(WorkerRecord):
    """A worker's heartbeat record as it published it, plus figures derived for people (the dashboard)."""

    cache_hit_rate: float | None = None
    heartbeat_age_s: float = 0.0
    budget_free_bytes: int = Field(default=0, description="budget no resident model holds")
    generation_kv_free_bytes: dict[str, int] = Field(
        default_factory=dict,
        description="by model: bytes of the generation engine's KV reservation its running batch leaves free",
    )


class WorkersList(_View):
    """``GET /workers``: every live worker, ready ones first, then by name."""

    read_at: float
    workers: list[WorkerView]


def workers_list(snapshot: FleetSnapshot) -> WorkersList:
    """The live workers' records, each with its cache hit rate, heartbeat age, free budget and free KV cache."""
    return WorkersList(
        read_at=snapshot.read_at,
        workers=[
            WorkerView.model_validate(
                {
                    **w.model_dump(),
                    "cache_hit_rate": hit_rate(w.cache_hits, w.cache_misses),
                    "heartbeat_age_s": max(0.0, snapshot.read_at - w.heartbeat_at),
                    "budget_free_bytes": w.free_budget_bytes,
                    "generation_kv_free_bytes": {m: g.kv_free_bytes for m, g in w.generation.items()},
                }
            )
            for w in snapshot.live()
        ],
    )


# -- /healthz ------------------------------------------------------------------------------------------------


class Health(_View):
    """``GET /healthz``: whether the API can read the fleet registry (HTTP 200) or not (HTTP 503)."""

    status: Literal["ok", "unavailable"]
    registry: str = Field(description="the registry's URL, password redacted")
    workers: int = 0
    ready: int = 0
    detail: str | None = None


def health(snapshot: FleetSnapshot, registry: str) -> Health:
    """A healthy answer: the registry answered with this snapshot."""
    return Health(status="ok", registry=registry, workers=len(snapshot.live()), ready=len(snapshot.ready()))
