#!/usr/bin/env python
"""Issue 13's per-job overhead, measured as a ratio in one run: a resident-model embed against a no-op Celery task.

    .venv/bin/python benchmarks/overhead_bench.py                 # 300 of each, interleaved
    .venv/bin/python benchmarks/overhead_bench.py --jobs 100      # quicker

writes ``benchmarks/results/overhead-<machine>-<date>.json`` and ``.md``. It starts a private redis-server and one
real ``gpufleet worker --cpu`` (diagnostics on) serving the demo models (``gpufleet models make-demo``), loads
MiniLM and warms it, then sends, one at a time and in rotating order, ``fleet.diag.noop`` (a bare Celery task
outside the fleet's job bookkeeping: what Celery itself costs), the same no-op answering 384 numbers (an answer as
large as the embedding's: what Celery costs to move it) and ``fleet.embed`` of one sentence on the resident
model. All go through the same producer path (:class:`gpufleet.tasks.client.FleetClient` ``submit`` then
``AsyncResult.get``) to the same worker, and each round trip is timed from before ``submit`` to after ``get``.

For the embeds: overhead = round trip - ``timings.compute_s`` (the model's forward, measured by the worker), per
job. The target: p50 overhead / p50 no-op round trip <= 1.3. It also reports the ratio against the no-op with the
embedding-sized answer, what the task itself spends outside the forward (``total_s - compute_s``, the worker-side
bookkeeping) and the queue wait the worker saw.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from gpufleet.tasks.client import FleetClient
from gpufleet.tasks.names import TaskName
from gpufleet.workers.tools import bench_fleet
from gpufleet.workers.tools.bench import machine_name
from gpufleet.workers.tools.demo import EMBED_MODEL
from gpufleet.workers.tools.launch import spawn_worker, stop_process, tail, wait_until_ready
from gpufleet.workers.tools.local_redis import LocalRedis

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SENTENCE = ["A man is eating food."]
EMBED_DIM = 384  # MiniLM's: the size of the payload-matched no-op's answer
TARGET_RATIO = 1.3
WARM_JOBS = 30
TIMEOUT_S = 60.0
WORKER = "overhead-cpu@bench"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary_ms(values_s: list[float]) -> dict[str, float]:
    """p50, p99 and mean of ``values_s`` in milliseconds."""
    return {
        "p50_ms": 1000 * statistics.median(values_s),
        "p99_ms": 1000 * percentile(values_s, 0.99),
        "mean_ms": 1000 * statistics.fmean(values_s),
    }


def machine() -> dict[str, Any]:
    """Where the figures come from: CPU, cores, Python and the versions that shape a round trip."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for package in ("torch", "transformers", "celery", "kombu", "redis", "pydantic"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    try:
        redis_server = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=False)
        versions["redis-server"] = redis_server.stdout.strip()
    except OSError:
        versions["redis-server"] = "unknown"
    return {
        "name": machine_name("cpu"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def round_trip(client: FleetClient, task: TaskName, **kwargs: Any) -> tuple[float, dict[str, Any]]:
    """One job through the producer path: submit, wait for its result; returns (seconds, result)."""
    started = time.perf_counter()
    result = client.submit(task, **kwargs)
    value = result.get(timeout=TIMEOUT_S)
    elapsed_s = time.perf_counter() - started
    result.forget()  # keeps the result backend from growing over the run, outside the timed part
    return elapsed_s, value


def measure(client: FleetClient, jobs: int) -> dict[str, Any]:
    """``jobs`` each of no-ops, payload-matched no-ops and one-sentence embeds, in rotating order."""
    noop_s: list[float] = []
    payload_s: list[float] = []
    embed_s: list[float] = []
    compute_s: list[float] = []
    overhead_s: list[float] = []
    in_task_s: list[float] = []
    queue_wait_s: list[float] = []

    def one_embed() -> None:
        elapsed_s, value = round_trip(client, TaskName.EMBED, model=EMBED_MODEL, texts=SENTENCE)
        timings = value["timings"]
        if timings["load_s"] > 0:
            raise SystemExit(f"the embed loaded its model ({timings['load_s']:.3f} s): it should stay resident")
        embed_s.append(elapsed_s)
        compute_s.append(float(timings["compute_s"]))
        overhead_s.append(elapsed_s - float(timings["compute_s"]))
        in_task_s.append(float(timings["total_s"]) - float(timings["compute_s"]))
        if timings["queue_wait_s"] is not None:
            queue_wait_s.append(float(timings["queue_wait_s"]))

    def one_noop() -> None:
        noop_s.append(round_trip(client, TaskName.NOOP)[0])

    def one_payload() -> None:
        elapsed_s, value = round_trip(client, TaskName.NOOP, floats=EMBED_DIM)
        if len(value["floats"]) != EMBED_DIM:
            raise SystemExit(f"the no-op answered {len(value['floats'])} numbers, not {EMBED_DIM}")
        payload_s.append(elapsed_s)

    steps = [one_noop, one_payload, one_embed]
    for index in range(jobs):  # each task goes first, second and third equally often
        for step in steps[index % 3 :] + steps[: index % 3]:
            step()
    noop, payload, overhead = summary_ms(noop_s), summary_ms(payload_s), summary_ms(overhead_s)
    return {
        "jobs_each": jobs,
        "noop_round_trip": noop,
        "noop_with_embedding_sized_answer_round_trip": payload,
        "embed_round_trip": summary_ms(embed_s),
        "embed_compute": summary_ms(compute_s),
        "embed_overhead": overhead,
        "embed_in_task_bookkeeping": summary_ms(in_task_s),
        "embed_queue_wait": summary_ms(queue_wait_s) if queue_wait_s else None,
        "ratio_overhead_over_noop_p50": overhead["p50_ms"] / noop["p50_ms"],
        "ratio_overhead_over_noop_p99": overhead["p99_ms"] / noop["p99_ms"],
        "ratio_overhead_over_payload_noop_p50": overhead["p50_ms"] / payload["p50_ms"],
        "added_by_gpufleet_p50_ms": overhead["p50_ms"] - noop["p50_ms"],
    }


def run(jobs: int, models: Path, work: Path, worker_env: dict[str, str]) -> dict[str, Any]:
    """Start Redis and a worker, warm MiniLM up, measure; everything started here is stopped here."""
    from gpufleet.workers.tools.demo_models import make_demo_models

    make_demo_models(models)
    with LocalRedis(work / "redis") as redis:
        env = bench_fleet.worker_env(
            redis,
            models,
            GPUFLEET_DIAGNOSTICS="true",
            GPUFLEET_WORKER__STATE_DIR=str(work / "state"),
            **worker_env,
        )
        client = bench_fleet.producer(env)
        log_path = work / "worker.log"
        worker = spawn_worker(env, log_path, name=WORKER)
        try:
            wait_until_ready(client, WORKER, worker, log_path)
            client.load_model(EMBED_MODEL).get(timeout=TIMEOUT_S)
            measure(client, WARM_JOBS)  # first forwards, connections, the registry's view of the resident model
            return measure(client, jobs)
        except Exception:
            print(f"--- worker log\n{tail(log_path)}", file=sys.stderr)
            raise
        finally:
            stop_process(worker)


def render_markdown(report: dict[str, Any]) -> str:
    result, host = report["result"], report["machine"]
    ratio = result["ratio_overhead_over_noop_p50"]

    def row(label: str, key: str) -> str:
        figures = result[key]
        if figures is None:
            return f"| {label} | n/a | n/a | n/a |"
        return f"| {label} | {figures['p50_ms']:.2f} | {figures['p99_ms']:.2f} | {figures['mean_ms']:.2f} |"

    versions = ", ".join(f"{name} {version}" for name, version in host["versions"].items())
    return "\n".join(
        [
            f"# Per-job overhead: {host['name']}, {report['date']}",
            "",
            f"{result['jobs_each']} each of `fleet.diag.noop`, `fleet.diag.noop` answering {EMBED_DIM} numbers and "
            f"one-sentence `fleet.embed` on a resident {EMBED_MODEL}, in rotating order, one at a time, through "
            "`FleetClient.submit` + `AsyncResult.get`, one `gpufleet worker --cpu`, a private redis-server"
            + (f"; worker environment {report['worker_env']}" if report["worker_env"] else "")
            + ".",
            "",
            "| what (ms) | p50 | p99 | mean |",
            "|---|---:|---:|---:|",
            row("no-op round trip (Celery's own)", "noop_round_trip"),
            row(f"no-op answering {EMBED_DIM} numbers", "noop_with_embedding_sized_answer_round_trip"),
            row("embed round trip", "embed_round_trip"),
            row("embed compute (`timings.compute_s`)", "embed_compute"),
            row("embed overhead = round trip - compute", "embed_overhead"),
            row("in the task, outside the forward (`total_s - compute_s`)", "embed_in_task_bookkeeping"),
            row("queue wait seen by the worker", "embed_queue_wait"),
            "",
            f"- overhead / no-op, p50: **{ratio:.2f}** (target <= {TARGET_RATIO}: "
            f"{'met' if ratio <= TARGET_RATIO else 'NOT met'}); p99: {result['ratio_overhead_over_noop_p99']:.2f}",
            "- overhead / no-op with an embedding-sized answer, p50: "
            f"{result['ratio_overhead_over_payload_noop_p50']:.2f} (what the fleet adds beyond Celery moving the "
            "same answer)",
            f"- gpufleet adds {result['added_by_gpufleet_p50_ms']:.2f} ms (p50) beyond Celery's own round trip",
            f"- machine: {host['cpu']}, {host['cores']} cores, Python {host['python']}; {versions}",
            "",
            f"Reproduce: `{report['command']}`",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=300, help="round trips of each task (default 300)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON and markdown results")
    parser.add_argument(
        "--models",
        type=Path,
        default=Path(tempfile.gettempdir()) / "gpufleet-overhead-models",
        help="model root for the demo models (created on first run, reused after)",
    )
    parser.add_argument("--tag", default="", help="appended to the file names (e.g. 'before')")
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra environment variable for the worker (repeatable), e.g. GPUFLEET_BATCHING__ENABLED=false",
    )
    args = parser.parse_args(argv)
    worker_env = dict(item.split("=", 1) for item in args.worker_env)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpufleet-overhead-") as scratch:
        result = run(args.jobs, args.models.resolve(), Path(scratch), worker_env)
    host = machine()
    command = "python benchmarks/overhead_bench.py" + (f" --jobs {args.jobs}" if args.jobs != 300 else "")
    command += "".join(f" --worker-env {key}={value}" for key, value in worker_env.items())
    report = {
        "machine": host,
        "date": dt.date.today().isoformat(),
        "command": command,
        "worker_env": worker_env,
        "result": result,
        "target_ratio": TARGET_RATIO,
        "wall_s": time.monotonic() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"overhead-{host['name']}-{report['date']}{'-' + args.tag if args.tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(render_markdown(report))
    print(render_markdown(report))
    print(f"wrote {stem}.json and .md", file=sys.stderr)
    return 0 if result["ratio_overhead_over_noop_p50"] <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
