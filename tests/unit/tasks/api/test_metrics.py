"""``/metrics`` over hand-built snapshots, read back with Prometheus' own text parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gpufleet.tasks.api.metrics import render_metrics
from gpufleet.tasks.fleet import FleetSnapshot, GenerationMetrics, HeldModel
from tests.unit.tasks.api.conftest import GIB, NOW, RecordFactory

H100 = {"worker": "h100-0@host-a", "gpu_type": "h100"}
CPU = {"worker": "cpu-0@host-b", "gpu_type": "cpu"}


def samples(snapshot: FleetSnapshot) -> list[Sample]:
    text = render_metrics(snapshot).decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def value(found: list[Sample], name: str, **labels: str) -> float:
    matches = [s.value for s in found if s.name == name and s.labels == labels]
    assert len(matches) == 1, f"{name}{labels}: {len(matches)} samples"
    return matches[0]


def test_per_worker_memory_gauges_in_bytes(fleet: FleetSnapshot) -> None:
    found = samples(fleet)
    assert value(found, "gpufleet_device_memory_total_bytes", **H100) == 80 * GIB
    assert value(found, "gpufleet_device_memory_budget_bytes", **H100) == 72 * GIB
    assert value(found, "gpufleet_device_memory_used_bytes", **H100) == 20 * GIB
    assert value(found, "gpufleet_device_memory_used_bytes", **CPU) == 1 * GIB
    assert value(found, "gpufleet_worker_ready", **CPU) == 0
    assert value(found, "gpufleet_worker_busy", **H100) == 1
    assert value(found, "gpufleet_worker_gpus", **CPU) == 0
    assert value(found, "gpufleet_worker_heartbeat_age_seconds", **H100) == 1.0
    info = {**H100, "host": "host-a", "device": "cuda:0 (NVIDIA H100 80GB HBM3)"}
    assert value(found, "gpufleet_worker_info", **info) == 1


def test_resident_and_parked_models_with_their_bytes(fleet: FleetSnapshot) -> None:
    found = samples(fleet)
    assert value(found, "gpufleet_resident_models", **H100) == 2
    assert value(found, "gpufleet_resident_model_bytes", **H100, model="org/llama-8b") == 16 * GIB
    assert value(found, "gpufleet_parked_models", **CPU) == 1
    assert value(found, "gpufleet_parked_model_bytes", **CPU, model="org/llama-8b") == 16 * GIB


def test_cache_and_job_counters_are_totals(fleet: FleetSnapshot) -> None:
    found = samples(fleet)
    assert value(found, "gpufleet_cache_hits_total", **H100) == 36
    assert value(found, "gpufleet_cache_misses_total", **CPU) == 6
    assert value(found, "gpufleet_cache_evictions_total", **CPU) == 2
    assert value(found, "gpufleet_jobs_total", **H100, task="fleet.generate", outcome="ok") == 30
    assert value(found, "gpufleet_jobs_total", **H100, task="fleet.generate", outcome="CapacityError") == 1
    assert value(found, "gpufleet_jobs_total", **H100, task="fleet.embed", outcome="ok") == 9


def test_load_seconds_histogram(fleet: FleetSnapshot) -> None:
    found = samples(fleet)
    buckets = {s.labels["le"]: s.value for s in found if s.name == "gpufleet_model_load_seconds_bucket"}
    assert buckets == {"0.5": 1, "2.5": 3, "10.0": 4, "+Inf": 4}
    assert value(found, "gpufleet_model_load_seconds_sum", **H100) == 12.5
    assert value(found, "gpufleet_model_load_seconds_count", **H100) == 4
    # The CPU worker published no buckets: no histogram series for it rather than an invalid one.
    loads = [s for s in found if s.name.startswith("gpufleet_model_load_seconds")]
    assert loads and not [s for s in loads if s.labels["worker"] == CPU["worker"]]


def test_generation_engine_series_per_worker_and_model(fleet: FleetSnapshot) -> None:
    found = samples(fleet)
    llama = {**H100, "model": "org/llama-8b"}
    assert value(found, "gpufleet_generation_prompt_tokens_total", **llama) == 1200
    assert value(found, "gpufleet_generation_generated_tokens_total", **llama) == 3000
    assert value(found, "gpufleet_generation_sequences_running", **llama) == 3
    assert value(found, "gpufleet_generation_sequences_waiting", **llama) == 1
    assert value(found, "gpufleet_generation_kv_cache_used_bytes", **llama) == 2 * GIB
    assert value(found, "gpufleet_generation_kv_cache_free_bytes", **llama) == 6 * GIB  # reserved 8 GiB - used
    for name, buckets, total, count in (
        ("gpufleet_generation_time_to_first_token_seconds", {"0.05": 2, "0.1": 5, "0.25": 6, "+Inf": 6}, 0.48, 6),
        ("gpufleet_generation_inter_token_latency_seconds", {"0.01": 100, "0.025": 2900, "+Inf": 2994}, 45.5, 2994),
    ):
        found_buckets = {s.labels["le"]: s.value for s in found if s.name == f"{name}_bucket"}
        assert found_buckets == buckets, name
        assert all(s.labels == {**llama, "le": s.labels["le"]} for s in found if s.name == f"{name}_bucket")
        assert value(found, f"{name}_sum", **llama) == total
        assert value(found, f"{name}_count", **llama) == count
    # The CPU worker's engine generated nothing: it has no generation series at all.
    generation = [s for s in found if s.name.startswith("gpufleet_generation_")]
    assert generation and {s.labels["worker"] for s in generation} == {H100["worker"]}


def test_a_generation_histogram_without_inf_is_left_out(record: RecordFactory) -> None:
    figures = GenerationMetrics(generated_tokens=4, ttft_s_buckets={"0.1": 1}, itl_s_buckets={"0.01": 3, "+Inf": 3})
    worker = record("cpu-1@h", generation={"org/tiny": figures})
    found = samples(FleetSnapshot(workers=(worker,), read_at=NOW))
    labels = {"worker": "cpu-1@h", "gpu_type": "cpu", "model": "org/tiny"}
    assert not [s for s in found if s.name.startswith("gpufleet_generation_time_to_first_token_seconds")]
    assert value(found, "gpufleet_generation_inter_token_latency_seconds_count", **labels) == 3
    assert value(found, "gpufleet_generation_generated_tokens_total", **labels) == 4


def test_queue_backlog_per_direct_queue(fleet: FleetSnapshot) -> None:
    found = samples(fleet)
    assert value(found, "gpufleet_queue_backlog", **H100, queue="h100.h100-0@host-a") == 2
    assert value(found, "gpufleet_queue_backlog", **CPU, queue="cpu.cpu-0@host-b") == 0


def test_expired_workers_are_not_exposed(fleet: FleetSnapshot) -> None:
    workers = {s.labels.get("worker") for s in samples(fleet)}
    assert workers == {"h100-0@host-a", "cpu-0@host-b"}


def test_a_bad_histogram_costs_only_its_own_series(record: RecordFactory) -> None:
    broken = record("cpu-1@h", load_s_buckets={"1.0": 2}, load_s_sum=1.0, cache_hits=3)  # no +Inf bucket
    unreadable = record("cpu-2@h", load_s_buckets={"fast": 1, "+Inf": 1})
    found = samples(FleetSnapshot(workers=(broken, unreadable), read_at=NOW))
    assert not [s for s in found if s.name.startswith("gpufleet_model_load_seconds")]
    assert value(found, "gpufleet_cache_hits_total", worker="cpu-1@h", gpu_type="cpu") == 3


def test_label_values_are_escaped(record: RecordFactory) -> None:
    odd = 'org/"quoted"\\name\nnewline'
    worker = record("cpu-1@h", resident=(HeldModel(model=odd, bytes=7),))
    found = samples(FleetSnapshot(workers=(worker,), read_at=NOW))
    assert value(found, "gpufleet_resident_model_bytes", worker="cpu-1@h", gpu_type="cpu", model=odd) == 7


def test_metric_names_follow_prometheus_conventions(fleet: FleetSnapshot) -> None:
    text = render_metrics(fleet).decode()
    families = list(text_string_to_metric_families(text))
    for family in families:
        assert family.name.startswith("gpufleet_"), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
    assert {f.name for f in families if f.type == "histogram"} == {
        "gpufleet_model_load_seconds",
        "gpufleet_generation_time_to_first_token_seconds",
        "gpufleet_generation_inter_token_latency_seconds",
    }
