"""``GET /metrics``: the live fleet in Prometheus' text exposition format, from one :class:`FleetSnapshot`.

Names follow Prometheus' conventions: a ``gpufleet_`` prefix, base units in the name (``_bytes``, ``_seconds``),
``_total`` on counters. Every per-worker series carries ``worker`` and ``gpu_type`` labels; per-model series add
``model`` (the generation engine's series are per worker and model), job counts add ``task`` and ``outcome``, the
backlog adds ``queue``. The counters are the workers' own
cumulative counts (since each pool child started), so a restarted worker resets them: Prometheus' ``rate()``
handles that as a counter reset.

A worker that stops heartbeating drops out of the snapshot and so out of the exposition; Prometheus marks its
series stale at the next scrape.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from gpufleet.tasks.fleet import FleetSnapshot, WorkerRecord

__all__ = ["CONTENT_TYPE_LATEST", "FleetCollector", "render_metrics"]

WORKER_LABELS = ["worker", "gpu_type"]
MODEL_LABELS = [*WORKER_LABELS, "model"]


class FleetCollector(Collector):
    """A Prometheus collector over one snapshot (built per scrape: the snapshot is the state).

    Args:
        snapshot: the fleet to expose; only its live workers are.
    """

    def __init__(self, snapshot: FleetSnapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        """Every metric family, each with one sample per live worker (per model, task, queue where labelled)."""
        workers = self.snapshot.live()
        yield from _worker_gauges(workers, self.snapshot.read_at)
        yield from _model_gauges(workers)
        yield from _counters(workers)
        yield _load_histogram(workers)
        yield from _generation(workers)


def render_metrics(snapshot: FleetSnapshot) -> bytes:
    """The exposition text of ``snapshot`` (serve it with ``CONTENT_TYPE_LATEST``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(snapshot))
    return generate_latest(registry)


def _labels(worker: WorkerRecord) -> list[str]:
    return [worker.name, worker.gpu_type]


def _gauge(name: str, documentation: str, workers: Iterable[WorkerRecord], value: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=WORKER_LABELS)
    for worker in workers:
        family.add_metric(_labels(worker), float(getattr(worker, value)))
    return family


def _worker_gauges(workers: tuple[WorkerRecord, ...], read_at: float) -> Iterator[Metric]:
    info = GaugeMetricFamily(
        "gpufleet_worker_info",
        "A live worker (value 1), with its host and device",
        labels=[*WORKER_LABELS, "host", "device"],
    )
    for worker in workers:
        info.add_metric([*_labels(worker), worker.host, worker.device], 1.0)
    yield info
    yield _gauge("gpufleet_worker_ready", "1 when the worker is warm and consuming its queues", workers, "ready")
    gpus = GaugeMetricFamily("gpufleet_worker_gpus", "GPUs the worker owns (0 on a CPU worker)", labels=WORKER_LABELS)
    busy = GaugeMetricFamily("gpufleet_worker_busy", "1 while the worker runs a job", labels=WORKER_LABELS)
    age = GaugeMetricFamily(
        "gpufleet_worker_heartbeat_age_seconds",
        "Seconds from the worker's last heartbeat to the registry read",
        labels=WORKER_LABELS,
    )
    for worker in workers:
        gpus.add_metric(_labels(worker), float(len(worker.gpu_indices)))
        busy.add_metric(_labels(worker), 1.0 if worker.running_job is not None else 0.0)
        age.add_metric(_labels(worker), max(0.0, read_at - worker.heartbeat_at))
    yield from (gpus, busy, age)
    yield _gauge(
        "gpufleet_device_memory_total_bytes",
        "Device memory of the worker's GPUs (host memory on a CPU worker)",
        workers,
        "memory_total_bytes",
    )
    yield _gauge(
        "gpufleet_device_memory_budget_bytes",
        "Device memory the worker may fill with models",
        workers,
        "memory_budget_bytes",
    )
    yield _gauge(
        "gpufleet_device_memory_used_bytes", "Device memory resident models hold", workers, "memory_used_bytes"
    )
    backlog = GaugeMetricFamily("gpufleet_queue_backlog", "Jobs waiting on a queue", labels=[*WORKER_LABELS, "queue"])
    for worker in workers:
        backlog.add_metric([*_labels(worker), worker.direct_queue], float(worker.backlog))
    yield backlog


def _model_gauges(workers: tuple[WorkerRecord, ...]) -> Iterator[Metric]:
    for tier, what in (("resident", "on the device"), ("parked", "parked in pinned host memory")):
        count = GaugeMetricFamily(f"gpufleet_{tier}_models", f"Models {what}", labels=WORKER_LABELS)
        size = GaugeMetricFamily(f"gpufleet_{tier}_model_bytes", f"Bytes of each model {what}", labels=MODEL_LABELS)
        for worker in workers:
            held = worker.resident if tier == "resident" else worker.parked
            count.add_metric(_labels(worker), float(len(held)))
            for model in held:
                size.add_metric([*_labels(worker), model.model], float(model.bytes))
        yield count
        yield size


def _counters(workers: tuple[WorkerRecord, ...]) -> Iterator[Metric]:
    for name, field, what in (
        ("gpufleet_cache_hits", "cache_hits", "Model requests the cache answered"),
        ("gpufleet_cache_misses", "cache_misses", "Model requests that needed a load (from disk or the parked tier)"),
        ("gpufleet_cache_evictions", "cache_evictions", "Models evicted from the device"),
    ):
        family = CounterMetricFamily(name, what, labels=WORKER_LABELS)
        for worker in workers:
            family.add_metric(_labels(worker), float(getattr(worker, field)))
        yield family
    jobs = CounterMetricFamily(
        "gpufleet_jobs",
        "Jobs finished, by task and outcome (ok, or the contract error's class name)",
        labels=[*WORKER_LABELS, "task", "outcome"],
    )
    for worker in workers:
        for key, count in sorted(worker.jobs_by_outcome.items()):
            task, _, outcome = key.partition("|")
            jobs.add_metric([*_labels(worker), task, outcome or "unknown"], float(count))
    yield jobs


def _load_histogram(workers: tuple[WorkerRecord, ...]) -> Metric:
    family = HistogramMetricFamily(
        "gpufleet_model_load_seconds", "Seconds to load a model (from disk or the parked tier)", labels=WORKER_LABELS
    )
    for worker in workers:
        buckets = _buckets(worker.load_s_buckets)
        if buckets:
            family.add_metric(_labels(worker), buckets, sum_value=worker.load_s_sum)
    return family


def _generation(workers: tuple[WorkerRecord, ...]) -> Iterator[Metric]:
    """The continuous-batching engines' series, one sample per worker and model it generated with.

    Tokens and latencies count finished sequences (a sequence's figures are recorded when it ends); the sequence
    and KV gauges are what the decode loop held at its last step, zeros once its session ended.
    """
    engines = [(worker, model, figures) for worker in workers for model, figures in sorted(worker.generation.items())]
    for name, field, what in (
        ("time_to_first_token", "ttft_s", "Seconds from a sequence joining the engine to its first token"),
        ("inter_token_latency", "itl_s", "Seconds between a sequence's consecutive generated tokens"),
    ):
        histogram = HistogramMetricFamily(f"gpufleet_generation_{name}_seconds", what, labels=MODEL_LABELS)
        for worker, model, figures in engines:
            buckets = _buckets(getattr(figures, f"{field}_buckets"))
            if buckets:
                histogram.add_metric([*_labels(worker), model], buckets, sum_value=getattr(figures, f"{field}_sum"))
        yield histogram
    for name, field, what in (
        ("prompt_tokens", "prompt_tokens", "Prompt tokens of the sequences the engine served"),
        ("generated_tokens", "generated_tokens", "Tokens the engine generated"),
    ):
        counter = CounterMetricFamily(f"gpufleet_generation_{name}", what, labels=MODEL_LABELS)
        for worker, model, figures in engines:
            counter.add_metric([*_labels(worker), model], float(getattr(figures, field)))
        yield counter
    for name, field, what in (
        ("sequences_running", "sequences_running", "Sequences in the engine's running batch"),
        ("sequences_waiting", "sequences_waiting", "Sequences waiting to join the running batch"),
        ("kv_cache_used_bytes", "kv_used_bytes", "Bytes the running batch's KV cache holds"),
        ("kv_cache_free_bytes", "kv_free_bytes", "Bytes of the engine's KV reservation the running batch leaves free"),
    ):
        gauge = GaugeMetricFamily(f"gpufleet_generation_{name}", what, labels=MODEL_LABELS)
        for worker, model, figures in engines:
            gauge.add_metric([*_labels(worker), model], float(getattr(figures, field)))
        yield gauge


def _buckets(raw: dict[str, int]) -> list[tuple[str, float]]:
    """A worker's cumulative buckets in order, or none when they are unusable (no ``+Inf``, an unreadable bound).

    Exposing a histogram without its ``+Inf`` bucket would make the whole scrape invalid, so one worker's bad
    record costs only its own histogram.
    """
    try:
        bounds = sorted(raw.items(), key=lambda item: float(item[0]))
    except ValueError:
        return []
    if not bounds or not math.isinf(float(bounds[-1][0])):
        return []
    return [("+Inf" if math.isinf(float(le)) else le, float(count)) for le, count in bounds]
