"""Hand-built fleet snapshots for the API's unit tests: two live workers of different types and one expired."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from gpufleet.tasks.fleet import FleetSnapshot, GenerationMetrics, HeldModel, RunningJob, WorkerRecord

NOW = 1_800_000_000.0
GIB = 2**30

RecordFactory = Callable[..., WorkerRecord]


def make_record(name: str, **fields: Any) -> WorkerRecord:
    """A worker record with plausible defaults (a ready CPU worker that heartbeated a second ago)."""
    gpu_type = fields.pop("gpu_type", "cpu")
    defaults: dict[str, Any] = {
        "name": name,
        "host": "host-a",
        "pid": 1234,
        "gpu_type": gpu_type,
        "device": "cpu",
        "type_queue": gpu_type if gpu_type == "cpu" else f"gpu.{gpu_type}",
        "direct_queue": f"{gpu_type}.{name}",
        "ready": True,
        "warm": True,
        "heartbeat_at": NOW - 1.0,
        "ttl_s": 10.0,
    }
    return WorkerRecord(**{**defaults, **fields})


@pytest.fixture
def record() -> RecordFactory:
    return make_record


@pytest.fixture
def fleet() -> FleetSnapshot:
    """An H100 worker holding two models (one pinned), generating with one and running a job, a CPU worker with one
    parked model, and an H100 worker whose heartbeat expired (it must appear nowhere)."""
    h100 = make_record(
        "h100-0@host-a",
        gpu_type="h100",
        device="cuda:0 (NVIDIA H100 80GB HBM3)",
        gpu_indices=(0,),
        memory_total_bytes=80 * GIB,
        memory_budget_bytes=72 * GIB,
        memory_used_bytes=20 * GIB,
        resident=(
            HeldModel(model="org/llama-8b", bytes=16 * GIB, pinned=True),
            HeldModel(model="sentence-transformers/all-MiniLM-L6-v2", bytes=4 * GIB),
        ),
        running_job=RunningJob(id="job-1", task="fleet.generate", model="org/llama-8b", started_at=NOW - 3.0),
        backlog=2,
        jobs_done=40,
        jobs_by_outcome={"fleet.generate|ok": 30, "fleet.embed|ok": 9, "fleet.generate|CapacityError": 1},
        load_s_buckets={"0.5": 1, "2.5": 3, "10.0": 4, "+Inf": 4},
        load_s_sum=12.5,
        cache_hits=36,
        cache_misses=4,
        cache_evictions=1,
        generation={
            "org/llama-8b": GenerationMetrics(
                prompt_tokens=1200,
                prefill_tokens=700,
                generated_tokens=3000,
                sequences_running=3,
                sequences_waiting=1,
                kv_used_bytes=2 * GIB,
                kv_reserved_bytes=8 * GIB,
                ttft_s_buckets={"0.05": 2, "0.1": 5, "0.25": 6, "+Inf": 6},
                ttft_s_sum=0.48,
                itl_s_buckets={"0.01": 100, "0.025": 2900, "+Inf": 2994},
                itl_s_sum=45.5,
            )
        },
        versions={"gpufleet": "0.1.0"},
    )
    cpu = make_record(
        "cpu-0@host-b",
        host="host-b",
        memory_total_bytes=16 * GIB,
        memory_budget_bytes=8 * GIB,
        memory_used_bytes=1 * GIB,
        resident=(HeldModel(model="sentence-transformers/all-MiniLM-L6-v2", bytes=1 * GIB),),
        parked=(HeldModel(model="org/llama-8b", bytes=16 * GIB),),
        cache_hits=4,
        cache_misses=6,
        cache_evictions=2,
        ready=False,
        warm=False,
    )
    dead = make_record(
        "h100-1@host-c",
        gpu_type="h100",
        gpu_indices=(1,),
        memory_total_bytes=80 * GIB,
        memory_budget_bytes=72 * GIB,
        resident=(HeldModel(model="org/ghost", bytes=GIB),),
        heartbeat_at=NOW - 60.0,
    )
    return FleetSnapshot(workers=(cpu, dead, h100), read_at=NOW)
