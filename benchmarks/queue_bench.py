#!/usr/bin/env python
"""Throughput through the queue: dynamic batching off vs on, measured in one run on one machine.

    .venv/bin/python -m benchmarks.queue_bench              # the full run (a few minutes on 2 CPU cores)
    .venv/bin/python -m benchmarks.queue_bench --quick      # fewer repetitions

writes ``benchmarks/results/queue-<machine>-<date>.json``, ``.md`` and ``.png``. For each mode (batching off, then
on) it starts one real ``gpufleet worker --cpu`` on a private redis-server with the demo models resident, and
measures, through :class:`gpufleet.tasks.client.FleetClient`:

- embed saturation: 256 one-sentence ``fleet.embed`` jobs enqueued at once; jobs/s until the last result;
- the same 256 sentences as one job (sentences/s): what the model does without a queue in between;
- generate: 16 and 64 concurrent ``fleet.generate`` jobs (tiny-chat, greedy, 32 new tokens); tokens/s;
- a lone job: one-sentence embeds sent one at a time, round trip p50/p99;
- per-job overhead: that round trip minus its compute, against a no-op Celery task's round trip
  (:mod:`benchmarks.overhead_bench` does this part).

Targets (CPU): embed saturation >= 4x off; queued jobs >= 0.63x the one-job throughput; generate (16)
>= 3x; lone-job latency with batching <= 1.1x without; overhead <= 1.3x a no-op round trip.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from celery.result import AsyncResult

from benchmarks.overhead_bench import machine, measure
from gpufleet.tasks.client import FleetClient
from gpufleet.workers.tools import bench_fleet
from gpufleet.workers.tools.bench import machine_name
from gpufleet.workers.tools.demo import CHAT_MODEL, EMBED_MODEL
from gpufleet.workers.tools.launch import spawn_worker, stop_process, tail, wait_until_ready
from gpufleet.workers.tools.local_redis import LocalRedis

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TIMEOUT_S = 300.0
SATURATION_JOBS = 256
NEW_TOKENS = 32
SENTENCE_WORDS = "the fleet serves many models on mixed GPUs through a task queue and answers every job once"
MODES = {"off": {"GPUFLEET_BATCHING__ENABLED": "false"}, "on": {"GPUFLEET_BATCHING__ENABLED": "true"}}
TARGETS = {
    "embed_saturation_speedup": 4.0,
    "queued_vs_one_job": 0.63,
    "generate_16_speedup": 3.0,
    "lone_latency_ratio": 1.1,
    "overhead_over_noop": 1.3,
}


def sentences(count: int) -> list[str]:
    """Distinct one-line sentences of a few lengths (a realistic mix, not one sentence repeated)."""
    words = SENTENCE_WORDS.split()
    return [" ".join(words[: 4 + i % 12]) + f" (job {i})" for i in range(count)]


def wait_all(jobs: list[AsyncResult]) -> list[dict[str, Any]]:
    """Every job's result, in order. Each ``get`` returns as its result is published; ResultSet.join_native was
    tried and rejected here: it polls on an interval (0.5 s), which shows up in short runs as lost throughput."""
    return [job.get(timeout=TIMEOUT_S) for job in jobs]


def saturate_embed(client: FleetClient, texts: list[str], queue: str) -> dict[str, Any]:
    """Enqueue one job per text at once; jobs/s from the first send to the last result."""
    started = time.perf_counter()
    jobs = [client.embed(EMBED_MODEL, [text], queue=queue) for text in texts]
    results = wait_all(jobs)
    wall_s = time.perf_counter() - started
    for job in jobs:
        job.forget()
    sizes = [r["timings"].get("batch_size", 1) for r in results]
    return {
        "jobs": len(jobs),
        "wall_s": wall_s,
        "jobs_per_s": len(jobs) / wall_s,
        "mean_batch": statistics.fmean(sizes),
    }


def one_job_embed(client: FleetClient, texts: list[str], queue: str) -> dict[str, Any]:
    """All texts as one job: the model's own throughput with the queue's cost paid once."""
    started = time.perf_counter()
    job = client.embed(EMBED_MODEL, texts, queue=queue)
    job.get(timeout=TIMEOUT_S)
    wall_s = time.perf_counter() - started
    job.forget()
    return {"sentences": len(texts), "wall_s": wall_s, "sentences_per_s": len(texts) / wall_s}


def saturate_generate(client: FleetClient, count: int, queue: str) -> dict[str, Any]:
    """``count`` greedy generate jobs at once; completion tokens/s until the last result."""
    prompts = [f"Job {i}: tell me about {'GPU ' * (1 + i % 5)}fleets." for i in range(count)]
    started = time.perf_counter()
    jobs = [client.generate(CHAT_MODEL, prompt=p, max_new_tokens=NEW_TOKENS, queue=queue) for p in prompts]
    results = wait_all(jobs)
    wall_s = time.perf_counter() - started
    for job in jobs:
        job.forget()
    tokens = sum(int(r["completion_tokens"]) for r in results)
    sizes = [r["timings"].get("batch_size", 1) for r in results]
    return {
        "jobs": count,
        "tokens": tokens,
        "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s,
        "mean_batch": statistics.fmean(sizes),
    }


def best(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The best of repeated runs (least disturbed by the machine's other load), with every run's figure kept."""
    chosen = dict(max(runs, key=lambda run: float(run[key])))
    chosen["all_runs"] = [round(float(run[key]), 2) for run in runs]
    return chosen


def run_mode(mode: str, models: Path, work: Path, repeats: int, lone_jobs: int, *, gpu: int | None) -> dict[str, Any]:
    """One worker with batching ``mode`` (on GPU ``gpu``, else the CPU); every figure of the mode."""
    with LocalRedis(work / f"redis-{mode}") as redis:
        env = bench_fleet.worker_env(
            redis,
            models,
            GPUFLEET_DIAGNOSTICS="true",  # fleet.diag.noop, the overhead baseline
            GPUFLEET_WORKER__STATE_DIR=str(work / f"state-{mode}"),
            **MODES[mode],
        )
        # Jobs go to the worker's own queue (found below), cpu or GPU alike: no GPU type to plan onto.
        client = bench_fleet.producer(env, gpu_types=())
        name = f"queue-{mode}@bench"
        log_path = work / f"worker-{mode}.log"
        worker = spawn_worker(env, log_path, gpu=gpu, name=name)
        try:
            wait_until_ready(client, name, worker, log_path)
            queue = client.status("gpu_status")[name]["queues"][-1]  # the worker's direct queue: only it consumes
            for model in (EMBED_MODEL, CHAT_MODEL):
                client.load_model(model, queue=queue).get(timeout=TIMEOUT_S)
            texts = sentences(SATURATION_JOBS)
            saturate_embed(client, texts[:32], queue)  # first forwards at each batch shape
            saturate_generate(client, 4, queue)
            figures: dict[str, Any] = {
                "device": client.status("gpu_status")[name]["device"],
                "embed_saturation": best([saturate_embed(client, texts, queue) for _ in range(repeats)], "jobs_per_s"),
                "embed_one_job": best([one_job_embed(client, texts, queue) for _ in range(repeats)], "sentences_per_s"),
                "generate_16": best([saturate_generate(client, 16, queue) for _ in range(repeats)], "tokens_per_s"),
                "generate_64": best(
                    [saturate_generate(client, 64, queue) for _ in range(max(1, repeats - 1))], "tokens_per_s"
                ),
            }
            figures["overhead"] = measure(client, lone_jobs)  # lone jobs, one at a time, against a no-op
            figures["lone_embed_round_trip"] = figures["overhead"]["embed_round_trip"]
            return figures
        except Exception:
            print(f"--- worker log ({mode})\n{tail(log_path)}", file=sys.stderr)
            raise
        finally:
            stop_process(worker)


def fairness(models: Path, work: Path) -> dict[str, Any]:
    """Two CPU workers, batching on, sharing the ``cpu`` queue: how 512 queued jobs, and a burst of 8, split."""
    with LocalRedis(work / "redis-fair") as redis:
        env = bench_fleet.worker_env(redis, models, GPUFLEET_WORKER__STATE_DIR=str(work / "state-fair"))
        client = bench_fleet.producer(env, gpu_types=())
        names = ["fair-a@bench", "fair-b@bench"]
        workers = [spawn_worker(env, work / f"{name}.log", name=name) for name in names]
        try:
            for name, worker in zip(names, workers, strict=True):
                wait_until_ready(client, name, worker, work / f"{name}.log")
            for name in names:
                queue = client.status("gpu_status")[name]["queues"][-1]
                client.load_model(EMBED_MODEL, queue=queue).get(timeout=TIMEOUT_S)

            def split(count: int) -> dict[str, int]:
                jobs = [client.embed(EMBED_MODEL, [text], queue="cpu") for text in sentences(count)]
                served = [job.get(timeout=TIMEOUT_S)["worker"] for job in jobs]
                return {name: served.count(name) for name in names}

            saturated = split(512)
            time.sleep(1.0)  # both idle again
            burst = split(8)
            return {"saturated_512": saturated, "burst_8": burst, "min_share": min(saturated.values()) / 512}
        finally:
            for worker in workers:
                stop_process(worker)


def ratios(off: dict[str, Any], on: dict[str, Any]) -> dict[str, float]:
    return {
        "embed_saturation_speedup": on["embed_saturation"]["jobs_per_s"] / off["embed_saturation"]["jobs_per_s"],
        "queued_vs_one_job": on["embed_saturation"]["jobs_per_s"] / on["embed_one_job"]["sentences_per_s"],
        "generate_16_speedup": on["generate_16"]["tokens_per_s"] / off["generate_16"]["tokens_per_s"],
        "generate_64_speedup": on["generate_64"]["tokens_per_s"] / off["generate_64"]["tokens_per_s"],
        "lone_latency_ratio": on["lone_embed_round_trip"]["p50_ms"] / off["lone_embed_round_trip"]["p50_ms"],
        "lone_latency_ratio_p99": on["lone_embed_round_trip"]["p99_ms"] / off["lone_embed_round_trip"]["p99_ms"],
        "overhead_over_noop": on["overhead"]["ratio_overhead_over_noop_p50"],
        "overhead_over_noop_off": off["overhead"]["ratio_overhead_over_noop_p50"],
    }


def target_met(key: str, value: float) -> bool:
    bound = TARGETS[key]
    return value <= bound if key in ("lone_latency_ratio", "overhead_over_noop") else value >= bound


def render_markdown(report: dict[str, Any]) -> str:
    off, on, r, host = report["off"], report["on"], report["ratios"], report["machine"]

    def line(label: str, key: str, fmt: str = "{:.2f}") -> str:
        verdict = ""
        if key in TARGETS:
            bound = TARGETS[key]
            sign = "<=" if key in ("lone_latency_ratio", "overhead_over_noop") else ">="
            verdict = f" (target {sign} {bound}: {'met' if target_met(key, r[key]) else 'NOT met'})"
        return f"- {label}: **{fmt.format(r[key])}**{verdict}"

    rows = [
        ("embed saturation, 256 one-sentence jobs (jobs/s)", "embed_saturation", "jobs_per_s"),
        ("the same 256 sentences as one job (sentences/s)", "embed_one_job", "sentences_per_s"),
        (f"generate, 16 concurrent, {NEW_TOKENS} new tokens (tokens/s)", "generate_16", "tokens_per_s"),
        (f"generate, 64 concurrent, {NEW_TOKENS} new tokens (tokens/s)", "generate_64", "tokens_per_s"),
    ]
    table = [
        f"| {label} | {off[key][field]:.1f} | {on[key][field]:.1f} | "
        f"{off[key].get('mean_batch', 1):.1f} / {on[key].get('mean_batch', 1):.1f} |"
        for label, key, field in rows
    ]
    lone = [
        f"| lone one-sentence embed, round trip p50 / p99 (ms) | {off['lone_embed_round_trip']['p50_ms']:.2f} / "
        f"{off['lone_embed_round_trip']['p99_ms']:.2f} | {on['lone_embed_round_trip']['p50_ms']:.2f} / "
        f"{on['lone_embed_round_trip']['p99_ms']:.2f} | |",
        f"| no-op Celery task round trip p50 (ms) | {off['overhead']['noop_round_trip']['p50_ms']:.2f} | "
        f"{on['overhead']['noop_round_trip']['p50_ms']:.2f} | |",
        f"| embed overhead = round trip - compute, p50 (ms) | {off['overhead']['embed_overhead']['p50_ms']:.2f} | "
        f"{on['overhead']['embed_overhead']['p50_ms']:.2f} | |",
    ]
    versions = ", ".join(f"{name} {version}" for name, version in host["versions"].items())
    return "\n".join(
        [
            f"# Queue throughput, batching off vs on: {host['name']}, {report['date']}",
            "",
            "One `gpufleet worker --cpu` per mode (off first, then on), a private redis-server, the demo models "
            f"resident; best of {report['repeats']} runs per figure (every run's figure is in the JSON).",
            "",
            "| what | batching off | batching on | mean batch (off / on) |",
            "|---|---:|---:|---:|",
            *table,
            *lone,
            "",
            line("embed saturation, on / off", "embed_saturation_speedup"),
            line("queued one-sentence jobs / the same sentences as one job (on)", "queued_vs_one_job"),
            line("generate 16, on / off", "generate_16_speedup"),
            line("generate 64, on / off", "generate_64_speedup"),
            line("lone-job latency p50, on / off", "lone_latency_ratio"),
            line("lone-job latency p99, on / off", "lone_latency_ratio_p99"),
            line("per-job overhead / no-op round trip, p50 (on)", "overhead_over_noop"),
            line("per-job overhead / no-op round trip, p50 (off)", "overhead_over_noop_off"),
            "",
            *fairness_lines(report.get("fairness")),
            f"Machine: {host['cpu']}, {host['cores']} cores, Python {host['python']}; {versions}.",
            "",
            f"Reproduce: `{report['command']}`",
            "",
        ]
    )


def fairness_lines(shares: dict[str, Any] | None) -> list[str]:
    if not shares:
        return []
    return [
        "Two workers (batching on) sharing one queue: 512 queued jobs served "
        + " / ".join(str(n) for n in shares["saturated_512"].values())
        + f" (smaller share {100 * shares['min_share']:.0f} %); a burst of 8 after both went idle: "
        + " / ".join(str(n) for n in shares["burst_8"].values())
        + ".",
        "",
    ]


def chart(report: dict[str, Any], path: Path) -> None:
    """Bars of each throughput figure, off vs on, and the ratios against their targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    off, on = report["off"], report["on"]
    labels = ["embed 256 jobs\n(jobs/s)", "generate 16\n(tokens/s)", "generate 64\n(tokens/s)"]
    keys = [("embed_saturation", "jobs_per_s"), ("generate_16", "tokens_per_s"), ("generate_64", "tokens_per_s")]
    figure, axes = plt.subplots(1, len(keys), figsize=(11, 3.6))
    for axis, label, (key, field) in zip(axes, labels, keys, strict=True):
        values = [off[key][field], on[key][field]]
        bars = axis.bar(["off", "on"], values, color=["#9aa5b1", "#2f7ed8"])
        axis.bar_label(bars, fmt="%.0f")
        axis.set_title(f"{label}: {values[1] / values[0]:.1f}x")
        axis.set_ylim(0, max(values) * 1.2)
    figure.suptitle(f"gpufleet dynamic batching, {report['machine']['name']}, {report['date']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="one run per figure, fewer lone jobs")
    parser.add_argument("--gpu", type=int, default=None, help="serve on this GPU (default: the CPU)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON, markdown and chart")
    parser.add_argument(
        "--models",
        type=Path,
        default=Path(tempfile.gettempdir()) / "gpufleet-queue-models",
        help="model root for the demo models (created on first run, reused after)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from gpufleet.workers.tools.demo_models import make_demo_models

    repeats, lone_jobs = (1, 60) if args.quick else (3, 200)
    models = args.models.resolve()
    make_demo_models(models)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpufleet-queue-") as scratch:
        figures = {mode: run_mode(mode, models, Path(scratch), repeats, lone_jobs, gpu=args.gpu) for mode in MODES}
        shares = fairness(models, Path(scratch)) if args.gpu is None else None  # one GPU: nothing to share
    host = machine()
    if args.gpu is not None:
        host["name"] = machine_name(f"cuda:{args.gpu}")  # the GPU's name, as the loader benchmark names it
    report: dict[str, Any] = {
        "machine": host,
        "date": dt.date.today().isoformat(),
        "command": "python -m benchmarks.queue_bench"
        + (" --quick" if args.quick else "")
        + (f" --gpu {args.gpu}" if args.gpu is not None else ""),
        "repeats": repeats,
        "off": figures["off"],
        "on": figures["on"],
        "ratios": ratios(figures["off"], figures["on"]),
        "fairness": shares,
        "targets": TARGETS,
        "wall_s": time.monotonic() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"queue-{host['name']}-{report['date']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(render_markdown(report))
    chart(report, stem.with_suffix(".png"))
    print(render_markdown(report))
    print(f"wrote {stem}.json, .md and .png", file=sys.stderr)
    return 0 if all(target_met(key, report["ratios"][key]) for key in TARGETS) else 1


if __name__ == "__main__":
    sys.exit(main())
