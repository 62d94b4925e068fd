#!/usr/bin/env python
"""Issue 9's affinity targets, measured as ratios in one run: live routing against type-queue routing.

    .venv/bin/python benchmarks/affinity_bench.py                 # 500 jobs, 6 models, 3 CPU workers
    .venv/bin/python benchmarks/affinity_bench.py --jobs 200      # quicker

writes ``benchmarks/results/affinity-<machine>-<date>.json`` and ``.md``. One trace (a fixed seed) of jobs over
six random-weight causal LMs of different architectures (``gpufleet.workers.tools.checkpoints``) with Zipf-like
popularity is served twice, each time by fresh ``gpufleet worker --cpu`` processes whose budgets
(``GPUFLEET_GPU__MEMORY_POOL__BUDGET_BYTES``) hold about two of the models, on a private redis-server:

* ``type``: the producer routes by GPU type alone (``GPUFLEET_FLEET__LIVE_ROUTING=false``): every job goes to the
  shared ``cpu`` queue and whichever worker is free takes it;
* ``live``: the producer routes on the live fleet: a job goes to the worker already holding its model.

For each: model loads (the workers' cache misses, summed from their heartbeats, cross-checked against the jobs
whose result reports a load), p50/p95 job latency (enqueue to result, seen by the producer, with a fixed number
of jobs in flight). Then, with the live fleet still up, the cost of one routing decision at steady state,
in-process: the pure function (``route_live`` over a snapshot) and the Celery router call (through the registry's
cache), p50/p99 over thousands of calls. Targets: loads live <= 0.5 x type; decision p99 <= 1 ms. Timings are
reported, never asserted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gpufleet.gpu.plan.selection import plan
from gpufleet.tasks.client import FleetClient, route_of
from gpufleet.tasks.fleet import FleetRegistry
from gpufleet.tasks.live_routing import route_live
from gpufleet.tasks.routing import FleetRouter
from gpufleet.tasks.settings import load_settings
from gpufleet.workers.tools.bench import machine_name
from gpufleet.workers.tools.checkpoints import make_checkpoint
from gpufleet.workers.tools.launch import spawn_worker, stop_process, tail, wait_until_ready
from gpufleet.workers.tools.local_redis import LocalRedis
from gpufleet.workers.tools.shapes import Shape

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ARCHS = ("llama", "qwen2", "mistral", "gpt2", "gpt_neox", "phi3")
# A few MB each: a load from disk costs tens of milliseconds on a CPU, a job with one new token a few.
SHAPE = Shape(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=688, max_positions=512)
MODELS_PER_BUDGET = 2.5  # each worker's budget holds two models, not three
ZIPF_S = 1.1
IN_FLIGHT = 4  # closed loop: a new job as soon as one answers
TIMEOUT_S = 120.0


def make_models(root: Path) -> dict[str, int]:
    """Six models under ``root`` (``bench/<arch>``), with their planned fp32 weights in bytes."""
    sizes = {}
    for seed, arch in enumerate(ARCHS):
        model = f"bench/{arch}"
        if not (root / model / "config.json").exists():
            make_checkpoint(root / model, arch, size=SHAPE, seed=seed)
        sizes[model] = plan(root / model, allowed_types=("cpu",)).weights_bytes
    return sizes


def zipf_trace(models: list[str], n_jobs: int, *, seed: int = 9) -> list[str]:
    """``n_jobs`` model names, model ``i`` drawn with probability proportional to ``1 / (i + 1) ** ZIPF_S``."""
    weights = [1 / (rank + 1) ** ZIPF_S for rank in range(len(models))]
    return random.Random(seed).choices(models, weights=weights, k=n_jobs)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_phase(
    mode: str,
    trace: list[str],
    *,
    redis: LocalRedis,
    db: int,
    model_root: Path,
    budget_bytes: int,
    workers: int,
    logs: Path,
    after: Any = None,
) -> dict[str, Any]:
    """Serve ``trace`` with fresh workers, the producer routing by ``mode`` (``type`` or ``live``)."""
    broker, backend = redis.url(db), redis.url(db + 1)
    env = {
        "GPUFLEET_BROKER_URL": broker,
        "GPUFLEET_RESULT_BACKEND": backend,
        "GPUFLEET_MODEL_ROOT": str(model_root),
        "GPUFLEET_GPU__MEMORY_POOL__BUDGET_BYTES": str(budget_bytes),
        "GPUFLEET_GPU__WARMUP__SIZE": "small",
        "GPUFLEET_WORKER__LOGLEVEL": "WARNING",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    settings = load_settings(
        broker_url=broker,
        result_backend=backend,
        model_root=model_root,
        # The type-queue producer needs the CPU named (else it plans onto gpu.t4); the live one finds it alone.
        fleet={"live_routing": mode == "live", "gpu_types": ("cpu",)},
    )
    registry = FleetRegistry(broker, cache_s=0.0)
    registry._client.flushdb()
    client = FleetClient(settings=settings)
    names = [f"cpu-{i}@{mode}" for i in range(workers)]
    processes = {name: spawn_worker(env, logs / f"{mode}-{name}.log", name=name) for name in names}
    try:
        for name, process in processes.items():
            wait_until_ready(client, name, process, logs / f"{mode}-{name}.log")
        _wait_registry(registry, names)
        latencies_s, load_jobs, queues, worker_timings = _serve(client, trace)
        time.sleep(2.5 * settings.fleet.heartbeat_interval_s)  # the last job's counters reach a heartbeat
        records = registry.snapshot(max_age_s=0).live()
        extra = after(settings, registry) if after is not None else {}
    finally:
        for process in processes.values():
            stop_process(process)
    return {
        "mode": mode,
        "jobs": len(trace),
        "loads": sum(record.cache_misses for record in records),
        "jobs_reporting_a_load": load_jobs,
        "loads_by_worker": {record.name: record.cache_misses for record in records},
        "jobs_by_worker": {record.name: record.jobs_done for record in records},
        "latency_p50_ms": 1000 * statistics.median(latencies_s),
        "latency_p95_ms": 1000 * percentile(latencies_s, 0.95),
        "latency_mean_ms": 1000 * statistics.fmean(latencies_s),
        "jobs_to_direct_queues": sum(1 for queue in queues if queue != "cpu"),
        "worker_timings": worker_timings,
        **extra,
    }


def _wait_registry(registry: FleetRegistry, names: list[str], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if {w.name for w in registry.snapshot(max_age_s=0).ready()} >= set(names):
            return
        time.sleep(0.2)
    raise SystemExit(f"the workers never all showed ready in the fleet registry within {timeout_s:g} s")


def _serve(client: FleetClient, trace: list[str]) -> tuple[list[float], int, list[str], dict[str, float]]:
    """Closed loop: IN_FLIGHT jobs at a time; returns latencies, jobs that loaded their model, queues used, and
    the workers' mean timings per job (queue wait, load, compute, total)."""
    pending: list[tuple[Any, float]] = []
    latencies_s: list[float] = []
    queues: list[str] = []
    loads = 0
    timings: dict[str, list[float]] = {"queue_wait_s": [], "load_s": [], "compute_s": [], "total_s": []}
    jobs = iter(trace)
    remaining = len(trace)
    while remaining:
        while len(pending) < IN_FLIGHT and len(latencies_s) + len(pending) < len(trace):
            model = next(jobs)
            result = client.generate(model, prompt="the fleet", max_new_tokens=1)
            route = route_of(result)
            queues.append(route.queue if route is not None else "?")
            pending.append((result, time.perf_counter()))
        still: list[tuple[Any, float]] = []
        for result, sent in pending:
            if result.ready():
                value = result.get(timeout=TIMEOUT_S)
                latencies_s.append(time.perf_counter() - sent)
                loads += 1 if value["timings"]["load_s"] > 0 else 0
                for key, values in timings.items():
                    values.append(float(value["timings"][key]))
                remaining -= 1
            elif time.perf_counter() - sent > TIMEOUT_S:
                raise SystemExit(f"job {result.id} got no answer within {TIMEOUT_S:g} s")
            else:
                still.append((result, sent))
        pending = still
        time.sleep(0.002)
    means = {f"mean_{key[:-2]}_ms": 1000 * statistics.fmean(values) for key, values in timings.items()}
    return latencies_s, loads, queues, means


def decision_cost(settings: Any, registry: FleetRegistry, models: list[str], calls: int) -> dict[str, Any]:
    """p50/p99 of one routing decision at steady state, in-process: the pure function and the router call."""
    snapshot = registry.snapshot(max_age_s=0)
    router = FleetRouter(settings)
    rng = random.Random(1)
    picks = [rng.choice(models) for _ in range(calls)]
    for model in models:  # steady state: the plans are cached, as after a producer's first job per model
        route_live(model, snapshot, settings)
        router("fleet.generate", (), {"model": model}, {})
    pure_ns, routed_ns = [], []
    gc.disable()  # as timeit does: a collection pause is the interpreter's, not the decision's
    for model in picks:
        started = time.perf_counter_ns()
        route_live(model, snapshot, settings)
        pure_ns.append(time.perf_counter_ns() - started)
    for model in picks:
        started = time.perf_counter_ns()
        router("fleet.generate", (), {"model": model}, {})
        routed_ns.append(time.perf_counter_ns() - started)
    gc.enable()

    def summary(values: list[int]) -> dict[str, float]:
        return {
            "p50_ms": percentile([v / 1e6 for v in values], 0.5),
            "p99_ms": percentile([v / 1e6 for v in values], 0.99),
        }

    return {"calls": calls, "route_live": summary(pure_ns), "celery_router": summary(routed_ns)}


def render_markdown(report: dict[str, Any]) -> str:
    type_, live, cost = report["type"], report["live"], report["decision_cost"]
    ratio = report["loads_ratio_live_over_type"]
    p99 = max(cost["route_live"]["p99_ms"], cost["celery_router"]["p99_ms"])

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    rows = [
        "| routing | model loads | jobs on direct queues | p50 latency | p95 latency |",
        "|---|---:|---:|---:|---:|",
    ]
    for phase in (type_, live):
        rows.append(
            f"| {phase['mode']} | {phase['loads']} | {phase['jobs_to_direct_queues']} | "
            f"{phase['latency_p50_ms']:.1f} ms | {phase['latency_p95_ms']:.1f} ms |"
        )
    setup = report["setup"]
    return "\n".join(
        [
            f"# Affinity benchmark: {report['machine']}, {report['date']}",
            "",
            f"{setup['jobs']} jobs over {len(setup['models'])} models (Zipf s={setup['zipf_s']}), {setup['workers']} "
            f"CPU workers with budgets of {setup['budget_bytes'] / 2**20:.1f} MiB (~{MODELS_PER_BUDGET:g} models), "
            f"{setup['in_flight']} jobs in flight, `generate` with max_new_tokens=1; the same trace, fresh workers "
            "per run.",
            "",
            *rows,
            "",
            f"- loads live / type: **{ratio:.2f}** (target <= 0.5: {met(ratio <= 0.5)})",
            f"- routing decision, {cost['calls']} calls at steady state: pure function p50 "
            f"{cost['route_live']['p50_ms'] * 1000:.0f} us, p99 {cost['route_live']['p99_ms'] * 1000:.0f} us; "
            f"Celery router call p50 {cost['celery_router']['p50_ms'] * 1000:.0f} us, p99 "
            f"{cost['celery_router']['p99_ms'] * 1000:.0f} us (target p99 <= 1 ms: {met(p99 <= 1.0)})",
            f"- loads per worker: type {type_['loads_by_worker']}, live {live['loads_by_worker']}",
            f"- jobs per worker: type {type_['jobs_by_worker']}, live {live['jobs_by_worker']}",
            f"- workers' mean timings per job: type {_rounded(type_['worker_timings'])}, live "
            f"{_rounded(live['worker_timings'])}",
            "",
            f"Reproduce: `{report['command']}`",
            "",
        ]
    )


def _rounded(values: dict[str, float]) -> str:
    return ", ".join(f"{key[5:]} {value:.1f}" for key, value in values.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--decision-calls", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpufleet-affinity-") as scratch:
        work = Path(scratch)
        sizes = make_models(work / "models")
        models = list(sizes)
        budget_bytes = int(MODELS_PER_BUDGET * max(sizes.values()))
        trace = zipf_trace(models, args.jobs)
        phase = {"model_root": work / "models", "budget_bytes": budget_bytes, "workers": args.workers}
        with LocalRedis(work / "redis") as redis:
            logs = work / "logs"
            try:
                type_run = run_phase("type", trace, redis=redis, db=2, logs=logs, **phase)
                print(f"type: {type_run['loads']} loads, p50 {type_run['latency_p50_ms']:.1f} ms", file=sys.stderr)
                live_run = run_phase(
                    "live",
                    trace,
                    redis=redis,
                    db=4,
                    logs=logs,
                    **phase,
                    after=lambda s, r: {"decision_cost": decision_cost(s, r, models, args.decision_calls)},
                )
            except Exception:
                for log in sorted(logs.glob("*.log")):
                    print(f"--- {log.name}\n{tail(log)}", file=sys.stderr)
                raise
    cost = live_run.pop("decision_cost")
    report = {
        "machine": machine_name("cpu"),
        "date": dt.date.today().isoformat(),
        "command": "python benchmarks/affinity_bench.py" + (f" --jobs {args.jobs}" if args.jobs != 500 else ""),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "setup": {
            "jobs": args.jobs,
            "workers": args.workers,
            "models": sizes,
            "popularity": {model: trace.count(model) for model in models},
            "zipf_s": ZIPF_S,
            "budget_bytes": budget_bytes,
            "in_flight": IN_FLIGHT,
        },
        "type": type_run,
        "live": live_run,
        "loads_ratio_live_over_type": live_run["loads"] / max(1, type_run["loads"]),
        "decision_cost": cost,
        "wall_s": time.monotonic() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"affinity-{report['machine']}-{report['date']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(render_markdown(report))
    print(render_markdown(report))
    print(f"wrote {stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
