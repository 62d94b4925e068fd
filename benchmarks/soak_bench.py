#!/usr/bin/env python
"""Issue 12's soak and fault benchmark: many jobs through two real workers, a kill -9 and a Redis restart midway.

    .venv/bin/python benchmarks/soak_bench.py                  # 10,000 jobs (a few minutes on 2 cores)
    .venv/bin/python benchmarks/soak_bench.py --jobs 2000      # quicker

writes ``benchmarks/results/soak-<machine>-<date>.json`` and ``.md``. It starts a private redis-server (AOF, as in
production) and two ``gpufleet worker --cpu`` with default fleet settings, and sends one-sentence ``fleet.embed``
jobs (batched by the workers) with a ``fleet.generate`` every ``--generate-every`` jobs, through
:class:`gpufleet.tasks.client.FleetClient` (live routing on), keeping at most ``--window`` unanswered. Along the way:

- at 30 % answered it kill -9s the whole of one worker (parent and pool child), notes which jobs that worker held
  (its held sets, :mod:`gpufleet.workers.parent.held_transport`), times how long until all of them are answered (by the
  other worker: the recovery time), and starts it again as a supervisor would;
- at 60 % answered it restarts Redis (the append-only file keeps what was queued and held) and goes on.

Results are read straight from the result backend (MGET of the result keys) and every final store is counted from
the backend's own PUBLISH of it, so a job answered twice shows even though its key is simply overwritten. Checked:
every job answered, exactly once, with the right shape (384 dimensions, a generated text). Worker memory (RSS of
the parent and its pool child) is sampled every 2 s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import redis
from overhead_bench import RESULTS, machine  # a sibling module: this file runs as a script

from gpufleet.tasks.client import FleetClient
from gpufleet.tasks.fleet import HELD_KEY_PREFIX, HOLDERS_KEY
from gpufleet.workers.tools import bench_fleet
from gpufleet.workers.tools.demo import CHAT_MODEL, EMBED_MODEL
from gpufleet.workers.tools.launch import spawn_worker, stop_process, wait_until_ready
from gpufleet.workers.tools.local_redis import LocalRedis

WORKERS = ("soak-a@bench", "soak-b@bench")
RESULT_PREFIX = "celery-task-meta-"
TIMEOUT_S = 600.0


class FinalStores(threading.Thread):
    """Counts the result backend's PUBLISH of each final state (one per store; a rerun would publish twice)."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(daemon=True, name="final-stores")
        self.client = client
        self.counts: Counter[str] = Counter()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                pubsub.psubscribe(RESULT_PREFIX + "*")
                while not self.stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message and json.loads(message["data"]).get("status") in ("SUCCESS", "FAILURE"):
                        self.counts[message["channel"].decode().removeprefix(RESULT_PREFIX)] += 1
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                time.sleep(0.2)  # Redis restarting: subscribe again


class MemorySampler(threading.Thread):
    """RSS of each worker (parent plus children) every ``interval_s``, in MiB."""

    def __init__(self, processes: dict[str, Any], interval_s: float = 2.0) -> None:
        super().__init__(daemon=True, name="memory")
        self.processes, self.interval_s = processes, interval_s
        self.samples: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            sample: dict[str, Any] = {"t_s": round(time.monotonic() - self.started, 1)}
            for name, process in self.processes.items():
                try:
                    parent = psutil.Process(process.pid)
                    if parent.status() == psutil.STATUS_ZOMBIE:
                        raise psutil.NoSuchProcess(process.pid)
                    rss = parent.memory_info().rss + sum(c.memory_info().rss for c in parent.children(recursive=True))
                    sample[name] = round(rss / 2**20, 1)
                except psutil.Error:
                    sample[name] = None  # killed, restarting
            self.samples.append(sample)


def held_job_ids(broker: redis.Redis, worker: str) -> set[str]:
    """The ids of the jobs ``worker`` holds unacknowledged right now (its held sets and kombu's unacked hash)."""
    ids = set()
    for raw_key in broker.zrange(HOLDERS_KEY, 0, -1):
        key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
        if not key.startswith(f"{HELD_KEY_PREFIX}{worker}:"):
            continue
        for tag in broker.smembers(key):
            entry = broker.hget("unacked", tag)
            if entry is not None:
                ids.add(json.loads(entry)[0]["headers"]["id"])
    return ids


def where_are(broker: redis.Redis, jobs: list[str]) -> dict[str, str]:
    """For unanswered jobs: on a queue list, unacknowledged (and in whose held set), or nowhere in the broker."""
    found: dict[str, str] = {}
    for raw_key in broker.keys("*"):
        key = raw_key.decode(errors="replace") if isinstance(raw_key, bytes) else str(raw_key)
        kind = broker.type(raw_key)
        if kind == b"list":
            for raw in broker.lrange(raw_key, 0, -1):
                found.setdefault(json.loads(raw)["headers"]["id"], f"queue {key}")
    holders: dict[Any, str] = {}
    entries: list[tuple[bytes, float]] = list(broker.zrange(HOLDERS_KEY, 0, -1, withscores=True))  # type: ignore[arg-type]
    for held_key, alive_until in entries:
        for tag in broker.smembers(held_key):
            holders[tag] = f"{held_key!r} (alive until {alive_until:.0f}, now {time.time():.0f})"
    for tag, entry in broker.hgetall("unacked").items():
        found.setdefault(json.loads(entry)[0]["headers"]["id"], "unacked, " + holders.get(tag, "in no held set"))
    return {job: found.get(job, "nowhere in the broker") for job in jobs}


def _state(backend: redis.Redis, job: str) -> str:
    raw = backend.get(RESULT_PREFIX + job)
    return "no result" if raw is None else str(json.loads(raw).get("status"))


def check(job: str, kind: str, meta: dict[str, Any]) -> str | None:
    """What is wrong with a job's stored result, or None."""
    if meta.get("status") != "SUCCESS":
        return f"{job}: {meta.get('status')} {str(meta.get('result'))[:200]}"
    result = meta["result"]
    if kind == "embed" and result.get("dim") != 384:
        return f"{job}: embedding of {result.get('dim')} dimensions"
    if kind == "generate" and not isinstance(result.get("text"), str):
        return f"{job}: no generated text"
    return None


def run(args: argparse.Namespace, models: Path, work: Path) -> dict[str, Any]:
    """Start Redis and two workers, send the jobs with the faults, collect and check; stops all it started."""
    from gpufleet.workers.tools.demo_models import make_demo_models

    make_demo_models(models)
    with LocalRedis(work / "redis") as server:
        env = bench_fleet.worker_env(server, models)
        client = bench_fleet.producer(env)
        broker, backend = redis.Redis.from_url(server.url(0)), redis.Redis.from_url(server.url(1))
        processes = {name: spawn_worker(env, work / f"{name}.log", name=name) for name in WORKERS}
        stores, memory = FinalStores(backend), MemorySampler(processes)
        try:
            for name, process in processes.items():
                wait_until_ready(client, name, process, work / f"{name}.log")
            stores.start()
            memory.start()
            return soak(
                args,
                client=client,
                broker=broker,
                backend=backend,
                server=server,
                processes=processes,
                env=env,
                work=work,
                stores=stores,
                memory=memory,
            )
        finally:
            stores.stop.set()
            memory.stop.set()
            for process in processes.values():
                stop_process(process)


def soak(
    args: argparse.Namespace,
    *,
    client: FleetClient,
    broker: redis.Redis,
    backend: redis.Redis,
    server: LocalRedis,
    processes: dict[str, Any],
    env: dict[str, str],
    work: Path,
    stores: FinalStores,
    memory: MemorySampler,
) -> dict[str, Any]:
    kinds: dict[str, str] = {}
    pending: set[str] = set()
    answered: dict[str, float] = {}
    problems: list[str] = []
    events: dict[str, Any] = {}
    kill_at, restart_at = int(args.jobs * 0.3), int(args.jobs * 0.6)
    started = time.monotonic()
    sent = 0

    def collect() -> None:
        for chunk in _chunks(sorted(pending), 500):
            for job, raw in zip(chunk, backend.mget([RESULT_PREFIX + job for job in chunk]), strict=True):
                if raw is None:
                    continue
                meta = json.loads(raw)
                if meta.get("status") not in ("SUCCESS", "FAILURE"):
                    continue
                pending.discard(job)
                answered[job] = time.monotonic()
                problem = check(job, kinds[job], meta)
                if problem:
                    problems.append(problem)

    while sent < args.jobs or pending:
        if time.monotonic() - started > args.timeout_s:
            break
        if sent < args.jobs and len(pending) < args.window:
            for _ in range(min(100, args.jobs - sent, args.window - len(pending))):
                if sent % args.generate_every == args.generate_every - 1:
                    job = client.generate(CHAT_MODEL, prompt=f"soak {sent}", max_new_tokens=3)
                    kinds[job.id] = "generate"
                else:
                    job = client.embed(EMBED_MODEL, [f"soak sentence number {sent}"])
                    kinds[job.id] = "embed"
                pending.add(job.id)
                sent += 1
        if len(answered) >= kill_at and "kill" not in events:
            events["kill"] = kill_one(broker, processes, env, work)
            events["kill"]["pending"] = len(pending)
        if len(answered) >= restart_at and "redis_restart" not in events:
            events["redis_restart"] = {"at_s": round(time.monotonic() - started, 1), "pending": len(pending)}
            server.restart()
        try:
            collect()
        except (redis.ConnectionError, redis.TimeoutError):
            time.sleep(0.2)
        kill = events.get("kill")
        if kill and "recovery_s" not in kill and all(job in answered for job in kill["held_ids"]):
            kill["recovery_s"] = round(max([kill["at"], *(answered[j] for j in kill["held_ids"])]) - kill["at"], 1)
        time.sleep(0.02 if sent >= args.jobs else 0.0)
    wall_s = time.monotonic() - started
    last_answer_s = max(answered.values(), default=started) - started
    runs = Counter(stores.counts[job] for job in kinds)
    kill = events.get("kill", {})
    kill.pop("held_ids", None)
    kill["at_s"] = round(kill.pop("at", started) - started, 1)
    return {
        "jobs": args.jobs,
        "generate_every": args.generate_every,
        "window": args.window,
        "wall_s": round(wall_s, 1),
        "last_answer_s": round(last_answer_s, 1),
        "jobs_per_s": round(len(answered) / max(last_answer_s, 1e-9), 1),
        "answered": len(answered),
        "lost": len(pending),
        "lost_where": where_are(broker, sorted(pending)[:50]) if pending else {},
        "lost_result_state": {job: _state(backend, job) for job in sorted(pending)[:50]},
        "stored_twice_or_more": sum(n for count, n in runs.items() if count >= 2),
        "stored_twice_ids": sorted(job for job in kinds if stores.counts[job] >= 2)[:50],
        "final_store_not_seen": runs.get(0, 0),
        "wrong": problems[:20],
        "wrong_count": len(problems),
        "kill": kill,
        "redis_restart": events.get("redis_restart"),
        "memory_mib": memory_summary(memory.samples),
    }


def kill_one(broker: redis.Redis, processes: dict[str, Any], env: dict[str, str], work: Path) -> dict[str, Any]:
    """kill -9 the whole first worker, note what it held, start it again; returns the event (``held_ids`` too)."""
    name = WORKERS[0]
    held = held_job_ids(broker, name)
    at = time.monotonic()
    os.killpg(processes[name].pid, 9)
    processes[name].wait()
    processes[name] = spawn_worker(env, work / f"{name}.restarted.log", name=name)  # the supervisor's restart
    return {"worker": name, "held_jobs": len(held), "held_ids": held, "at": at}


def memory_summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"samples": samples}
    for name in WORKERS:
        values = [s[name] for s in samples if s.get(name) is not None]
        if values:
            summary[name] = {"first": values[0], "last": values[-1], "max": max(values)}
    return summary


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def render_markdown(report: dict[str, Any]) -> str:
    result, host = report["result"], report["machine"]
    kill, restart, memory = result["kill"], result["redis_restart"] or {}, result["memory_mib"]
    lines = [
        f"# Soak and faults: {host['name']}, {report['date']}",
        "",
        f"{result['jobs']} jobs (one-sentence `fleet.embed` on {EMBED_MODEL}, a `fleet.generate` every "
        f"{result['generate_every']}) through two `gpufleet worker --cpu` with default settings, at most "
        f"{result['window']} unanswered; kill -9 of one whole worker at 30 % answered, a Redis restart (AOF) at 60 %.",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| jobs answered / lost | {result['answered']} / {result['lost']} |",
        f"| answered twice or more / wrong | {result['stored_twice_or_more']} / {result['wrong_count']} |",
        f"| throughput (first send to last answer, faults included) | {result['jobs_per_s']} jobs/s over "
        f"{result['last_answer_s']} s |",
        f"| jobs held by the killed worker | {kill.get('held_jobs')} |",
        f"| recovery: kill -9 to the last of them answered | {kill.get('recovery_s')} s |",
        f"| jobs unanswered when Redis restarted | {restart.get('pending')} |",
    ]
    for name in WORKERS:
        if name in memory:
            figures = memory[name]
            lines.append(
                f"| {name} RSS first / last / max (MiB) | {figures['first']} / {figures['last']} / {figures['max']} |"
            )
    lines += [
        "",
        f"- final stores not seen by the subscriber (reconnecting across the Redis restart): "
        f"{result['final_store_not_seen']}",
        f"- machine: {host['cpu']}, {host['cores']} cores, Python {host['python']}"
        + (f"; {report['note']}" if report.get("note") else ""),
        "",
        f"Reproduce: `{report['command']}`",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs to send (default 10000)")
    parser.add_argument("--generate-every", type=int, default=50, help="one generate job every N (default 50)")
    parser.add_argument("--window", type=int, default=1000, help="most unanswered jobs at a time (default 1000)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON and markdown results")
    parser.add_argument("--timeout-s", type=float, default=TIMEOUT_S, help="give up after this long (default 600)")
    parser.add_argument("--logs", type=Path, default=None, help="keep the worker logs in this directory")
    parser.add_argument("--note", default="", help="a remark for the report (e.g. 'machine shared with other work')")
    parser.add_argument(
        "--models", type=Path, default=Path(tempfile.gettempdir()) / "gpufleet-overhead-models", help="model root"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="gpufleet-soak-") as scratch:
        work = Path(scratch)
        if args.logs is not None:  # worker logs kept: Redis still lives in the scratch directory
            args.logs.mkdir(parents=True, exist_ok=True)
            for name in WORKERS:
                for suffix in (".log", ".restarted.log"):
                    (work / f"{name}{suffix}").symlink_to((args.logs / f"{name}{suffix}").resolve())
        result = run(args, args.models.resolve(), work)
    host = machine()
    command = "python benchmarks/soak_bench.py" + (f" --jobs {args.jobs}" if args.jobs != 10_000 else "")
    report = {"machine": host, "date": dt.date.today().isoformat(), "command": command, "note": args.note}
    report["result"] = result
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"soak-{host['name']}-{report['date']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(render_markdown(report))
    print(render_markdown(report))
    ok = result["lost"] == 0 and result["stored_twice_or_more"] == 0 and result["wrong_count"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
