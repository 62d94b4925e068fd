"""The API's answers over hand-built snapshots: fleet-wide sums, per-worker breakdowns, expired workers left out."""

from __future__ import annotations

import pytest

from gpufleet.tasks.api import views
from gpufleet.tasks.fleet import FleetSnapshot, HeldModel
from tests.unit.tasks.api.conftest import GIB, NOW, RecordFactory

LIVE = {"h100-0@host-a", "cpu-0@host-b"}


def test_gpu_status_sums_live_workers_fleet_wide_and_per_type(fleet: FleetSnapshot) -> None:
    answer = views.gpu_status(fleet)
    assert set(answer.workers) == LIVE
    assert answer.fleet.workers == 2
    assert answer.fleet.ready == 1
    assert answer.fleet.gpus == 1  # the CPU worker owns no GPU
    assert answer.fleet.memory == views.MemoryFigures(
        total_bytes=96 * GIB,
        budget_bytes=80 * GIB,
        used_bytes=21 * GIB,
        free_budget_bytes=59 * GIB,
        kv_reserved_bytes=8 * GIB,  # the H100 worker's decode loop
    )
    assert set(answer.fleet.by_gpu_type) == {"cpu", "h100"}
    h100 = answer.fleet.by_gpu_type["h100"]
    assert (h100.workers, h100.ready, h100.gpus) == (1, 1, 1)
    assert h100.memory.used_bytes == 20 * GIB


def test_cpu_workers_on_one_host_count_its_memory_once(fleet: FleetSnapshot) -> None:
    # Two CPU workers on one 23.5 GiB host reported 50.5 GB before: each counted the host's whole memory.
    cpu = next(w for w in fleet.workers if w.name == "cpu-0@host-b")
    twin = cpu.model_copy(update={"name": "cpu-1@host-b", "direct_queue": "cpu.cpu-1@host-b"})
    other_host = cpu.model_copy(update={"name": "cpu-0@host-c", "host": "host-c"})
    both = views.gpu_status(fleet.model_copy(update={"workers": (*fleet.workers, twin, other_host)}))
    alone = views.gpu_status(fleet)
    assert both.fleet.memory.total_bytes == alone.fleet.memory.total_bytes + cpu.memory_total_bytes
    assert both.fleet.memory.budget_bytes == alone.fleet.memory.budget_bytes + 2 * cpu.memory_budget_bytes


def test_gpu_status_breaks_down_each_worker(fleet: FleetSnapshot) -> None:
    worker = views.gpu_status(fleet).workers["h100-0@host-a"]
    assert worker.gpu_type == "h100"
    assert worker.direct_queue == "h100.h100-0@host-a"
    assert worker.memory.free_budget_bytes == 52 * GIB
    assert worker.running_job is not None and worker.running_job.task == "fleet.generate"
    assert worker.backlog == 2
    assert worker.heartbeat_age_s == pytest.approx(1.0)
    assert worker.versions == {"gpufleet": "0.1.0"}


def test_models_status_says_where_each_model_is_held(fleet: FleetSnapshot) -> None:
    answer = views.models_status(fleet)
    by_model = {m.model: m for m in answer.models}
    assert list(by_model) == sorted(by_model)
    assert "org/ghost" not in by_model  # held only by the expired worker
    llama = by_model["org/llama-8b"]
    assert (llama.resident_on, llama.parked_on) == (["h100-0@host-a"], ["cpu-0@host-b"])
    assert llama.pinned_on == ["h100-0@host-a"]
    assert (llama.resident_bytes, llama.parked_bytes) == (16 * GIB, 16 * GIB)
    minilm = by_model["sentence-transformers/all-MiniLM-L6-v2"]
    assert sorted(minilm.resident_on) == sorted(LIVE)
    assert minilm.resident_bytes == 5 * GIB
    cpu = answer.workers["cpu-0@host-b"]
    assert (cpu.resident_bytes, cpu.parked_bytes, cpu.ready) == (1 * GIB, 16 * GIB, False)
    assert [m.model for m in cpu.parked] == ["org/llama-8b"]


def test_cache_status_rates_come_from_summed_counters(fleet: FleetSnapshot) -> None:
    answer = views.cache_status(fleet)
    assert (answer.fleet.hits, answer.fleet.misses, answer.fleet.evictions) == (40, 10, 3)
    assert answer.fleet.hit_rate == pytest.approx(40 / 50)  # not the mean of 0.9 and 0.4
    assert answer.workers["h100-0@host-a"].hit_rate == pytest.approx(0.9)
    assert answer.workers["cpu-0@host-b"].hit_rate == pytest.approx(0.4)
    assert (answer.fleet.resident_models, answer.fleet.parked_models) == (3, 1)
    assert answer.fleet.parked_bytes == 16 * GIB


def test_hit_rate_is_unknown_before_any_request(record: RecordFactory) -> None:
    snapshot = FleetSnapshot(workers=(record("cpu-1@h"),), read_at=NOW)
    assert views.cache_status(snapshot).workers["cpu-1@h"].hit_rate is None
    assert views.workers_list(snapshot).workers[0].cache_hit_rate is None


def test_workers_list_keeps_the_record_and_adds_derived_figures(fleet: FleetSnapshot) -> None:
    answer = views.workers_list(fleet)
    assert [w.name for w in answer.workers] == ["h100-0@host-a", "cpu-0@host-b"]  # ready first
    h100 = answer.workers[0]
    assert h100.cache_hit_rate == pytest.approx(0.9)
    assert h100.budget_free_bytes == 52 * GIB
    assert h100.heartbeat_age_s == pytest.approx(1.0)
    assert h100.generation_kv_free_bytes == {"org/llama-8b": 6 * GIB}  # the engine's 8 GiB less the 2 GiB used
    assert answer.workers[1].generation_kv_free_bytes == {}
    # Everything the worker published is passed on unchanged.
    original = fleet.get("h100-0@host-a")
    assert original is not None
    assert h100.model_dump(include=set(type(original).model_fields)) == original.model_dump()
    assert h100.resident[0] == HeldModel(model="org/llama-8b", bytes=16 * GIB, pinned=True)


def test_an_empty_fleet_answers_zeros(record: RecordFactory) -> None:
    empty = FleetSnapshot(read_at=NOW)
    assert views.gpu_status(empty).fleet.workers == 0
    assert views.models_status(empty).models == []
    assert views.cache_status(empty).fleet.hit_rate is None
    assert views.workers_list(empty).workers == []
    health = views.health(empty, "redis://:***@r:6379/0")
    assert (health.status, health.workers, health.ready) == ("ok", 0, 0)
