#!/usr/bin/env python
"""Serving generate jobs three ways in one run on one machine: the continuous engine, the static path, transformers.

    .venv/bin/python -m benchmarks.generation_bench              # the full run (est. 30-45 min on 2 CPU cores)
    .venv/bin/python -m benchmarks.generation_bench --quick      # one repeat, 24 Poisson jobs, one rate (~10-15 min)

writes ``benchmarks/results/generation-<machine>-<date>.json``, ``.md`` and ``.png``. The model is built once
into a model root (``--models``, reused after): a random-weight Llama of 8 layers x 512 (intermediate 1376, 8 heads,
the local demo tokenizer's 1024-token vocabulary, 2048 positions), float32, saved with ``save_pretrained`` in the
standard layout as ``gpufleet/generation-bench-8x512``. Its end-of-sequence token is the tokenizer's ``<|end|>``,
whose output row is zeroed: its logit is always 0 while the other 1023 are random, so greedy decoding never picks
it (checked at build time, and on every job: each generates exactly ``max_new_tokens``).

The three ways, each fed the same prompts (16-40 tokens of varied English; greedy; ``max_new_tokens`` cycling
16 / 64 / 192):

- A: through the queue, a real ``gpufleet worker --cpu`` with ``GPUFLEET_GENERATION__ENGINE=continuous``;
- B: the same with ``GPUFLEET_GENERATION__ENGINE=static`` (jobs batched, each batch one left-padded ``generate``);
- C: transformers' own continuous batching in this process, no queue (``init_continuous_batching``).

Each of A and B gets a fresh worker on a private redis-server, the model loaded (``fleet.load_model``) and a few
warm-up jobs before anything is timed; C gets a fresh manager per workload run (so its prefix cache never carries
over from one run to the next) after a warm-up of its own. Time to done is from just before a job is sent to when
its result is published (read from the result backend's own PUBLISH, one pattern subscription), or for C to when
its finished output reaches the one reader thread. Workloads:

1. Poisson arrivals at 3 jobs/s (60 jobs; ``--quick``: 24), and 1.5 and 6 jobs/s in the full run: p50 / p99 time
   to done per length;
2. 48 jobs at once: output tokens/s (completion tokens / wall time) and p50 / p99 time to done per length;
3. streaming (A, and C for reference): 48 streamed jobs at once and a lone streamed job through
   ``FleetClient.generate_stream``: time to first token p50 / p99, inter-token latency p50; lone non-streamed jobs
   (A and B) and a no-op Celery round trip (``fleet.diag.noop``) for the lone-job rules;
4. prefix sharing: 32 jobs sharing a 200-token system prompt against 32 distinct prompts of the same length:
   prompt tokens prefilled, from the worker's heartbeat (``generation.prefill_tokens`` per model, the registry) when
   the engine publishes it, and for C from the prefix matches its paged cache makes (page size 32 for this workload).

Figures are medians over the repeats (2 in the full run, 1 with ``--quick``). Targets, as ratios within the run:
Poisson 3/s p50 per length A <= 1.3x C; 48 at once tokens/s A >= 0.9x C and A >= B; 48 at once 16-token p50
A <= 1.3x C; lone streamed first token <= (no-op round trip + C's lone time to first token) x 1.3; lone
non-streamed p50 per length A <= 1.1x B. The exit status is 1 when one is missed or could not be measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from celery.result import AsyncResult

from benchmarks.overhead_bench import machine, percentile, round_trip
from gpufleet.tasks.client import FleetClient
from gpufleet.tasks.fleet import FleetRegistry
from gpufleet.tasks.names import TaskName
from gpufleet.tasks.settings import load_settings
from gpufleet.workers.tools import bench_fleet
from gpufleet.workers.tools.bench import machine_name
from gpufleet.workers.tools.checkpoints import is_complete, model_config, publish_atomically
from gpufleet.workers.tools.launch import spawn_worker, stop_process, tail, wait_until_ready
from gpufleet.workers.tools.local_redis import LocalRedis
from gpufleet.workers.tools.shapes import Shape
from gpufleet.workers.tools.tokenizer import CORPUS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TIMEOUT_S = 600.0
LENGTHS = (16, 64, 192)
SHAPE = Shape(hidden=512, layers=8, heads=8, kv_heads=8, intermediate=1376, max_positions=2048)
TINY_SHAPE = Shape(hidden=128, layers=2, heads=4, kv_heads=4, intermediate=344, max_positions=2048)
MODEL_REQUIRED = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json")
SYSTEM_TOKENS = 200  # the shared (or distinct) leading passage of the prefix workload
PREFIX_NEW_TOKENS = 16
PREFIX_PAGE_SIZE = 32  # C's page size in the prefix workload: a 200-token prefix spans 6 full pages
LONE_STREAM_TOKENS = 64
STREAM_PROBE_TIMEOUT_S = 60.0
SEED = 0
MODES = {
    "continuous": {"GPUFLEET_GENERATION__ENGINE": "continuous"},
    "static": {"GPUFLEET_GENERATION__ENGINE": "static"},
}
LABELS = {
    "continuous": "A: queue, continuous engine",
    "static": "B: queue, static path",
    "transformers": "C: transformers CB, in-process",
}
# key -> (comparison, bound); every ratio is measured in this run, on this machine.
TARGETS: dict[str, tuple[str, float]] = {
    **{f"poisson_3_p50_{n}_A_over_C": ("<=", 1.3) for n in LENGTHS},
    "burst_tokens_per_s_A_over_C": (">=", 0.9),
    "burst_tokens_per_s_A_over_B": (">=", 1.0),
    "burst_p50_16_A_over_C": ("<=", 1.3),
    "lone_stream_ttft_A_over_noop_plus_C": ("<=", 1.3),
    **{f"lone_p50_{n}_A_over_B": ("<=", 1.1) for n in LENGTHS},
    "prefix_prefilled_shared_over_distinct_A": ("<=", 0.5),
}


@dataclass(frozen=True)
class Sizes:
    """How much of each workload one run sends."""

    repeats: int
    poisson_jobs: int
    rates: tuple[float, ...]
    burst_jobs: int
    stream_jobs: int
    lone_per_length: int
    lone_streams: int
    prefix_jobs: int
    noop_jobs: int
    warm_jobs: int


FULL = Sizes(2, 60, (3.0, 1.5, 6.0), 48, 48, 6, 10, 32, 100, 6)
QUICK = Sizes(1, 24, (3.0,), 48, 48, 3, 5, 32, 30, 6)


def tiny(sizes: Sizes) -> Sizes:
    """Development sizes (``--tiny``): a handful of each job, for a 2 x 128 model."""
    return replace(
        sizes,
        poisson_jobs=9,
        burst_jobs=12,
        stream_jobs=12,
        lone_per_length=1,
        lone_streams=3,
        prefix_jobs=8,
        noop_jobs=10,
        warm_jobs=3,
    )


@dataclass(frozen=True)
class Job:
    prompt: str
    max_new_tokens: int


# --- the model ------------------------------------------------------------------------------------------------


def model_id(shape: Shape) -> str:
    return f"gpufleet/generation-bench-{shape.layers}x{shape.hidden}"


def make_model(root: Path, shape: Shape) -> tuple[str, Path]:
    """Build the benchmark's model under ``root`` (``org/name``) unless a complete copy is there; (id, path)."""
    name = model_id(shape)
    path = root / name

    def build(target: Path) -> None:
        import torch

        from gpufleet.workers.tools.families import auto_class
        from gpufleet.workers.tools.tokenizer import demo_tokenizer

        tokenizer = demo_tokenizer()
        config = model_config("llama", shape, tokenizer=tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            model = auto_class("llama").from_config(config).eval()
        eos = int(tokenizer.eos_token_id)
        with torch.no_grad():
            model.get_output_embeddings().weight[eos].zero_()  # logit 0 against 1023 random ones: never the argmax
        model.generation_config.do_sample = False
        model.generation_config.eos_token_id = eos
        model.generation_config.pad_token_id = int(tokenizer.pad_token_id)
        model.generation_config.bos_token_id = int(tokenizer.bos_token_id)
        check_eos_unreachable(model, tokenizer, [job.prompt for job in workload_prompts(tokenizer, 4)])
        model.save_pretrained(str(target))
        tokenizer.save_pretrained(str(target))
        (target / "README.md").write_text(
            f"# {name}\n\nA random-weight Llama ({shape.layers} layers x {shape.hidden}, seed {SEED}) with the demo "
            "tokenizer, made by `python -m benchmarks.generation_bench`. The output row of its end-of-sequence token "
            "is zeroed, so greedy decoding never ends a job early: every job generates max_new_tokens.\n"
        )

    if not is_complete(path, MODEL_REQUIRED):
        publish_atomically(path, build, required=MODEL_REQUIRED)
    return name, path


def check_eos_unreachable(model: Any, tokenizer: Any, prompts: list[str], new_tokens: int = max(LENGTHS)) -> None:
    """Greedy ``new_tokens`` for each prompt must never produce the end-of-sequence token.

    Raises:
        SystemExit: it did (the benchmark's jobs would end early and the three ways would not do the same work).
    """
    import torch

    eos = int(model.generation_config.eos_token_id)
    device = next(model.parameters()).device
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=int(tokenizer.pad_token_id),
            )
        produced = out[0, ids.shape[1] :].tolist()
        if eos in produced or len(produced) < new_tokens:
            raise SystemExit(
                f"greedy decoding ended {prompt!r} after {len(produced)} of {new_tokens} tokens (end-of-sequence "
                f"token {eos}): the three ways would not do the same work"
            )


# --- prompts --------------------------------------------------------------------------------------------------


def corpus_words() -> list[str]:
    return CORPUS.split()


def workload_prompts(tokenizer: Any, count: int) -> list[Job]:
    """``count`` distinct prompts of 16 to 40 tokens from the tokenizer's corpus; lengths cycle 16 / 64 / 192."""
    words = corpus_words()
    jobs = []
    for index in range(count):
        target = 16 + (index * 11) % 25  # 16 .. 40 tokens, varied
        start = (index * 37) % len(words)
        picked: list[str] = [f"({index})"]
        while len(tokenizer(" ".join(picked))["input_ids"]) < target:
            picked.append(words[(start + len(picked)) % len(words)])
        jobs.append(Job(" ".join(picked), LENGTHS[index % len(LENGTHS)]))
    return jobs


def passage(tokenizer: Any, start: int, tokens: int = SYSTEM_TOKENS) -> str:
    """Corpus words from ``start`` until they make ``tokens`` tokens (the tokenizer's BOS counted)."""
    words = corpus_words()
    picked: list[str] = []
    while len(tokenizer(" ".join(picked))["input_ids"]) < tokens:
        picked.append(words[(start + len(picked)) % len(words)])
    return " ".join(picked)


def prefix_prompts(tokenizer: Any, count: int) -> dict[str, list[Job]]:
    """``shared``: one 200-token system passage then a short distinct question; ``distinct``: a different
    200-token passage per job (starting at another word) then the same questions."""
    system = passage(tokenizer, 0)
    questions = [f"\nQuestion {i}: what happened next in part {i}?" for i in range(count)]
    return {
        "shared": [Job(system + q, PREFIX_NEW_TOKENS) for q in questions],
        "distinct": [Job(passage(tokenizer, 1 + 13 * i) + q, PREFIX_NEW_TOKENS) for i, q in enumerate(questions)],
    }


def poisson_arrivals(count: int, rate: float) -> list[float]:
    """Seconds after the start at which each job arrives (exponential gaps; one fixed schedule per rate)."""
    rng = random.Random(f"{SEED}-{rate}")
    at, arrivals = 0.0, []
    for _ in range(count):
        arrivals.append(at)
        at += rng.expovariate(rate)
    return arrivals


# --- figures --------------------------------------------------------------------------------------------------


@dataclass
class Record:
    """One job: its length, when it was sent and done (perf_counter seconds), and, streamed, its deltas."""

    max_new_tokens: int
    sent: float
    done: float = math.nan
    completion_tokens: int = 0
    prompt_tokens: int = 0
    batch_size: float = 1.0
    deltas: list[tuple[float, int]] | None = None  # (arrival, completion tokens so far)
    key: str = ""  # C's request id


def ms_summary(values_s: list[float]) -> dict[str, float]:
    return {"p50_ms": 1000 * statistics.median(values_s), "p99_ms": 1000 * percentile(values_s, 0.99)}


def by_length(records: list[Record]) -> dict[str, Any]:
    """p50 / p99 time to done per length (and over all jobs)."""
    figures: dict[str, Any] = {}
    for length in LENGTHS:
        latencies = [r.done - r.sent for r in records if r.max_new_tokens == length]
        if latencies:
            figures[str(length)] = {**ms_summary(latencies), "jobs": len(latencies)}
    figures["all"] = {**ms_summary([r.done - r.sent for r in records]), "jobs": len(records)}
    return figures


def throughput(records: list[Record]) -> dict[str, Any]:
    """Completion tokens over the wall time from the first send to the last result, with per-length latencies."""
    wall_s = max(r.done for r in records) - min(r.sent for r in records)
    tokens = sum(r.completion_tokens for r in records)
    return {
        "jobs": len(records),
        "tokens": tokens,
        "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s,
        "mean_batch": statistics.fmean(r.batch_size for r in records),
        "short_jobs": sum(r.completion_tokens != r.max_new_tokens for r in records),
        "latency": by_length(records),
    }


def stream_figures(records: list[Record]) -> dict[str, Any]:
    """Time to first token p50 / p99 and inter-token latency p50 / p99 (a delta of k tokens counts k gaps)."""
    ttft: list[float] = []
    gaps: list[float] = []
    for record in records:
        deltas = record.deltas or []
        if not deltas:
            continue
        ttft.append(deltas[0][0] - record.sent)
        for (before, tokens_before), (after, tokens_after) in itertools.pairwise(deltas):
            step = max(1, tokens_after - tokens_before)
            gaps.extend([(after - before) / step] * step)
    if not ttft:
        return {"skipped": "no job streamed a delta"}
    return {
        "jobs": len(records),
        "streamed_jobs": len(ttft),
        "ttft_p50_ms": 1000 * statistics.median(ttft),
        "ttft_p99_ms": 1000 * percentile(ttft, 0.99),
        "itl_p50_ms": 1000 * statistics.median(gaps) if gaps else None,
        "itl_p99_ms": 1000 * percentile(gaps, 0.99) if gaps else None,
        "short_jobs": sum(r.completion_tokens != r.max_new_tokens for r in records),
        "latency": by_length(records),
    }


def median_of(runs: list[Any]) -> Any:
    """The runs' figures merged: each number the median over the runs (each run's kept as ``all_runs`` where it
    is a headline figure); text and other values from the first run."""
    first = runs[0]
    if isinstance(first, dict):
        merged = {key: median_of([run[key] for run in runs if isinstance(run, dict) and key in run]) for key in first}
        for headline in ("tokens_per_s", "p50_ms", "ttft_p50_ms"):
            if headline in first and len(runs) > 1 and all(isinstance(r.get(headline), int | float) for r in runs):
                merged[f"{headline}_runs"] = [round(float(r[headline]), 2) for r in runs]
        return merged
    if isinstance(first, bool) or not isinstance(first, int | float):
        return first
    if all(isinstance(run, int) and not isinstance(run, bool) for run in runs):
        return statistics.median_low(runs)  # counts stay counts
    numbers = [float(run) for run in runs if isinstance(run, int | float)]
    return statistics.median(numbers) if numbers else None


# --- A and B: through the queue -------------------------------------------------------------------------------


class ResultWatcher(threading.Thread):
    """When each job's final state is published: one pattern subscription on the result backend's Redis (the
    worker PUBLISHes each result it stores). ``AsyncResult.get`` one job after another would see a job done only
    after the ones before it."""

    def __init__(self, client: FleetClient) -> None:
        super().__init__(daemon=True, name="result-watcher")
        backend = client.app.backend
        self.redis = backend.client
        self.prefix = bytes(backend.task_keyprefix)
        self.decode: Callable[[Any], Any] = backend.decode
        self.done: dict[str, float] = {}
        self.changed = threading.Condition()
        self.stop = threading.Event()
        self.subscribed = threading.Event()

    def run(self) -> None:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.psubscribe(self.prefix + b"*")
        self.subscribed.set()
        try:
            while not self.stop.is_set():
                message = pubsub.get_message(timeout=0.05)
                if not message:
                    continue
                now = time.perf_counter()
                try:
                    status = self.decode(message["data"]).get("status")
                except Exception:  # not a result's meta: not ours to read
                    continue
                if status in ("SUCCESS", "FAILURE", "REVOKED"):
                    job_id = bytes(message["channel"])[len(self.prefix) :].decode()
                    with self.changed:
                        self.done.setdefault(job_id, now)
                        self.changed.notify_all()
        finally:
            pubsub.close()

    def start(self) -> None:
        super().start()
        if not self.subscribed.wait(10.0):
            raise RuntimeError("could not subscribe to the result backend's publications")

    def wait(self, job_ids: list[str], timeout_s: float = TIMEOUT_S) -> dict[str, float]:
        """When each of ``job_ids`` was done (perf_counter seconds)."""
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while not all(job_id in self.done for job_id in job_ids):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sum(job_id not in self.done for job_id in job_ids)
                    raise TimeoutError(f"{missing} of {len(job_ids)} jobs had no result after {timeout_s:g} s")
                self.changed.wait(min(left, 1.0))
            return {job_id: self.done[job_id] for job_id in job_ids}

    def close(self) -> None:
        self.stop.set()
        self.join(5.0)


@dataclass
class Served:
    """One worker of a mode, as the workloads use it."""

    client: FleetClient
    watcher: ResultWatcher
    queue: str
    model: str
    name: str
    registry: FleetRegistry | None


def send_jobs(q: Served, jobs: list[Job], arrivals: list[float] | None = None) -> list[Record]:
    """Send ``jobs`` (at once, or each at its arrival offset), wait for all; one record per job."""
    sent: list[tuple[AsyncResult, Record]] = []
    start = time.perf_counter()
    for index, job in enumerate(jobs):
        if arrivals is not None:
            wait_s = start + arrivals[index] - time.perf_counter()
            if wait_s > 0:
                time.sleep(wait_s)
        record = Record(job.max_new_tokens, time.perf_counter())
        result = q.client.generate(q.model, prompt=job.prompt, max_new_tokens=job.max_new_tokens, queue=q.queue)
        sent.append((result, record))
    done = q.watcher.wait([result.id for result, _ in sent])
    for result, record in sent:
        value = result.get(timeout=TIMEOUT_S)  # published already: this only reads it
        result.forget()
        record.done = done[result.id]
        record.completion_tokens = int(value["completion_tokens"])
        record.prompt_tokens = int(value["prompt_tokens"])
        record.batch_size = float(value["timings"].get("batch_size", 1))
    return [record for _, record in sent]


def stream_jobs(q: Served, jobs: list[Job]) -> list[Record]:
    """``jobs`` streamed at once through ``FleetClient.generate_stream``, one reader thread per job.

    Each job's send time is taken just before its message goes out: the sends are serialized (Celery's result
    consumer subscribes on one shared connection when a job is sent, which is not thread-safe), so a thread's
    wait for its turn is not counted as its latency.
    """
    records: list[Record | None] = [None] * len(jobs)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def one(index: int, job: Job) -> None:
        sent_at: list[float] = []
        deltas: list[tuple[float, int]] = []
        result: dict[str, Any] = {}
        try:
            barrier.wait(30.0)
            for item in q.client.generate_stream(
                q.model,
                prompt=job.prompt,
                max_new_tokens=job.max_new_tokens,
                queue=q.queue,
                timeout_s=TIMEOUT_S,
                _sent_at=sent_at,
            ):
                now = time.perf_counter()
                if isinstance(item, dict):
                    result = item
                else:
                    deltas.append((now, int(item.completion_tokens)))
            record = Record(job.max_new_tokens, sent_at[0], done=time.perf_counter(), deltas=deltas)
            record.completion_tokens = int(result.get("completion_tokens", 0))
            record.prompt_tokens = int(result.get("prompt_tokens", 0))
            records[index] = record
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i, job), daemon=True) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
    if errors:
        raise errors[0]
    return [record for record in records if record is not None]


def timed_sends(client: FleetClient) -> None:
    """Serialize ``client.submit`` across threads and let a caller learn when its job went out.

    ``generate_stream`` forwards its extra keyword arguments to ``submit``: a ``_sent_at`` list given to it is
    taken out here and gets the time just before the message is sent.
    """
    submit, lock = client.submit, threading.Lock()

    def locked_submit(task: TaskName | str, queue: str | None = None, **kwargs: Any) -> AsyncResult:
        sent_at = kwargs.pop("_sent_at", None)
        with lock:
            if sent_at is not None:
                sent_at.append(time.perf_counter())
            return submit(task, queue=queue, **kwargs)

    setattr(client, "submit", locked_submit)  # noqa: B010  (an instance attribute over the method, on purpose)


def probe_streaming(q: Served) -> str | None:
    """None when a streamed job streams; else why the streaming workloads are skipped."""
    if not hasattr(q.client, "generate_stream"):
        return "FleetClient.generate_stream does not exist yet (tasks/client.py)"
    deltas = 0
    try:
        for item in q.client.generate_stream(
            q.model,
            prompt="A short probe of the stream.",
            max_new_tokens=16,
            queue=q.queue,
            timeout_s=STREAM_PROBE_TIMEOUT_S,
        ):
            if not isinstance(item, dict):
                deltas += 1
    except TimeoutError:
        return (
            f"a streamed job's token stream did not end within {STREAM_PROBE_TIMEOUT_S:g} s: the worker does not "
            "write token streams (gpufleet:stream:<job id>) yet"
        )
    except Exception as exc:
        return f"a streamed job failed: {type(exc).__name__}: {exc}"
    if deltas == 0:
        return "a streamed job answered with no text deltas before its result: the worker does not stream yet"
    return None


def engine_prompt_tokens(q: Served, after: float) -> int | None:
    """The worker's ``generation.prefill_tokens`` for the model (the continuous engine's count of prompt tokens
    computed: a shared prefix counts once), from the first heartbeat published a little after wall time ``after``;
    None if it publishes none."""
    if q.registry is None:
        return None
    deadline = time.monotonic() + 15.0
    while time.monotonic() < deadline:
        record = q.registry.snapshot(max_age_s=0).get(q.name)
        if record is not None and record.heartbeat_at > after + 1.0:
            metrics = record.generation.get(q.model)
            return None if metrics is None else int(metrics.prefill_tokens)
        time.sleep(0.25)
    return None


def prefix_queue(q: Served, sets: dict[str, list[Job]]) -> dict[str, Any]:
    """Each prompt set at once: prompt tokens sent, and prefilled as the engine counts them (when it does)."""
    figures: dict[str, Any] = {}
    counts = engine_metrics(q) is not None  # the static path publishes no engine figures
    for label, jobs in sets.items():
        before = engine_prompt_tokens(q, time.time()) if counts else None
        records = send_jobs(q, jobs)
        after = engine_prompt_tokens(q, time.time()) if counts else None
        prompt_tokens = sum(r.prompt_tokens for r in records)
        observed = after - before if after is not None and before is not None else None
        figures[label] = {
            **throughput(records),
            "prompt_tokens": prompt_tokens,
            "prefilled_tokens": observed,
            "prefilled_source": "worker heartbeat (generation.prefill_tokens)" if observed is not None else None,
        }
    return figures


def lone_jobs(q: Served, jobs: list[Job]) -> dict[str, Any]:
    """One job at a time, non-streamed: time to done per length."""
    records = [send_jobs(q, [job])[0] for job in jobs]
    return by_length(records)


def run_mode(
    mode: str, model: str, models: Path, work: Path, *, sizes: Sizes, w: Workloads, gpu: int | None
) -> dict[str, Any]:
    """One fresh worker with ``GPUFLEET_GENERATION__ENGINE=<mode>``; every figure of the mode."""
    with LocalRedis(work / f"redis-{mode}") as redis:
        env = bench_fleet.worker_env(
            redis,
            models,
            GPUFLEET_DIAGNOSTICS="true",  # fleet.diag.noop, the lone-job baseline
            GPUFLEET_WORKER__STATE_DIR=str(work / f"state-{mode}"),
            **MODES[mode],
        )
        client = bench_fleet.producer(env, gpu_types=())
        settings = load_settings(
            broker_url=env["GPUFLEET_BROKER_URL"],
            result_backend=env["GPUFLEET_RESULT_BACKEND"],
            model_root=models,
            fleet={"gpu_types": ()},
        )
        name = f"generation-{mode}@bench"
        log_path = work / f"worker-{mode}.log"
        worker = spawn_worker(env, log_path, gpu=gpu, name=name)
        watcher = ResultWatcher(client)
        timed_sends(client)
        try:
            wait_until_ready(client, name, worker, log_path)
            queue = client.status("gpu_status")[name]["queues"][-1]  # the worker's direct queue: only it consumes
            client.load_model(model, queue=queue).get(timeout=TIMEOUT_S)
            watcher.start()
            q = Served(client, watcher, queue, model, name, FleetRegistry.from_settings(settings))
            send_jobs(q, w.warm)  # first forwards at a few batch shapes
            send_jobs(q, w.warm[:1])
            for _ in range(5):
                round_trip(client, TaskName.NOOP)
            figures: dict[str, Any] = {
                "label": LABELS[mode],
                "device": client.status("gpu_status")[name]["device"],
                "worker_env": MODES[mode],
                "load_average_1m_at_start": os.getloadavg()[0],  # others share the machine: how busy it was
            }
            progress(mode, "lone jobs and no-ops")
            figures["lone"] = median_of([lone_jobs(q, w.lone) for _ in range(sizes.repeats)])
            figures["noop"] = ms_summary([round_trip(client, TaskName.NOOP)[0] for _ in range(sizes.noop_jobs)])
            figures["poisson"] = {}
            for rate in sizes.rates:
                progress(mode, f"Poisson {rate:g}/s")
                arrivals = poisson_arrivals(len(w.poisson), rate)
                figures["poisson"][f"{rate:g}"] = median_of(
                    [throughput(send_jobs(q, w.poisson, arrivals)) for _ in range(sizes.repeats)]
                )
            progress(mode, f"{len(w.burst)} at once")
            figures["burst"] = median_of([throughput(send_jobs(q, w.burst)) for _ in range(sizes.repeats)])
            if mode == "continuous":
                skipped = probe_streaming(q)
                if skipped is None:
                    progress(mode, "streaming")
                    figures["stream_burst"] = median_of(
                        [stream_figures(stream_jobs(q, w.stream)) for _ in range(sizes.repeats)]
                    )
                    figures["stream_lone"] = stream_figures([stream_jobs(q, [job])[0] for job in w.lone_streams])
                else:
                    print(f"[{mode}] streaming skipped: {skipped}", file=sys.stderr)
                    figures["stream_burst"] = figures["stream_lone"] = {"skipped": skipped}
            progress(mode, "prefix sharing")
            figures["prefix"] = median_of([prefix_queue(q, w.prefix) for _ in range(sizes.repeats)])
            engine = engine_metrics(q)
            figures["engine_metrics"] = engine
            figures["engine_observed"] = bool(engine and (engine.get("generated_tokens") or 0) > 0)
            return figures
        except Exception:
            print(f"--- worker log ({mode})\n{tail(log_path)}", file=sys.stderr)
            raise
        finally:
            watcher.close()
            stop_process(worker)


def engine_metrics(q: Served) -> dict[str, Any] | None:
    """The continuous engine's per-model figures from the worker's last heartbeat (None when it has none)."""
    if q.registry is None:
        return None
    record = q.registry.snapshot(max_age_s=0).get(q.name)
    metrics = record.generation.get(q.model) if record is not None else None
    return None if metrics is None else metrics.model_dump(mode="json")


def progress(mode: str, what: str) -> None:
    print(f"[{mode}] {what}", file=sys.stderr, flush=True)


# --- C: transformers' continuous batching, in-process --------------------------------------------------------


class CBRun:
    """One transformers continuous-batching manager, started, with the one thread that reads its results.

    Every result is read here, in one place, and routed by ``request_id`` (``get_result(request_id)`` may hand out
    another request's result, so no caller asks for its own).
    """

    def __init__(self, owner: TransformersCB, *, page_size: int | None, max_sequences: int, longest: int) -> None:
        import torch

        self.owner = owner
        cb_config = owner.cb_config(page_size=page_size, max_sequences=max_sequences, longest=longest)
        self.manager = owner.model.init_continuous_batching(
            generation_config=owner.generation_config, continuous_batching_config=cb_config
        )
        self.records: dict[str, Record] = {}
        self.errors: dict[str, str] = {}
        self.changed = threading.Condition()
        self.stop = threading.Event()
        self.matched: dict[str, int] = {}  # request id -> prompt tokens its prefix match reused
        self.counter = 0
        with torch.inference_mode():
            self.manager.start()
        self.reader = threading.Thread(target=self._read, daemon=True, name="cb-reader")
        self.reader.start()
        # Ready before anything is timed, as the workers are: the manager's thread builds its batch processor and
        # paged cache as it starts, and one short request runs the first forwards on them.
        deadline = time.monotonic() + 60.0
        while getattr(self.manager, "batch_processor", None) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        self.run([Job("A short request to warm the manager up.", 2)])

    def count_prefix_matches(self) -> bool:
        """Wrap the paged cache's prefix search to count the tokens each request reuses; False if not exposed."""
        cache = getattr(getattr(self.manager, "batch_processor", None), "cache", None)
        search = getattr(cache, "search_prefix_match", None)
        if cache is None or search is None:
            return False

        def counting(request_id: str, prompt_ids: list[int]) -> int:
            matched = int(search(request_id, prompt_ids))
            self.matched[request_id] = max(matched, self.matched.get(request_id, 0))
            return matched

        cache.search_prefix_match = counting
        return bool(getattr(cache, "use_prefix_sharing", False))

    def _read(self) -> None:
        while not self.stop.is_set():
            output = self.manager.get_result(timeout=0.05)
            if output is None:
                continue
            now = time.perf_counter()
            with self.changed:
                record = self.records.get(output.request_id)
                if record is None:
                    continue
                tokens = len(output.generated_tokens)
                if record.deltas is not None and tokens and (not record.deltas or record.deltas[-1][1] < tokens):
                    record.deltas.append((now, tokens))
                if output.is_finished():
                    if output.error:
                        self.errors[output.request_id] = str(output.error)
                    self.owner.tokenizer.decode(output.generated_tokens, skip_special_tokens=True)  # what a job returns
                    record.done, record.completion_tokens = now, tokens
                    record.prompt_tokens = len(output.prompt_ids)
                    self.changed.notify_all()

    def send(self, job: Job, *, stream: bool = False) -> str:
        self.counter += 1
        request_id = f"job-{self.counter}"
        record = Record(job.max_new_tokens, time.perf_counter(), deltas=[] if stream else None, key=request_id)
        with self.changed:
            self.records[request_id] = record
        ids = self.owner.tokenizer(job.prompt)["input_ids"]
        self.manager.add_request(
            input_ids=list(ids), request_id=request_id, max_new_tokens=job.max_new_tokens, streaming=stream
        )
        return request_id

    def wait(self, request_ids: list[str], timeout_s: float = TIMEOUT_S) -> list[Record]:
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while any(math.isnan(self.records[r].done) for r in request_ids):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"transformers' continuous batching did not finish within {timeout_s:g} s")
                self.changed.wait(min(left, 1.0))
        failed = [self.errors[r] for r in request_ids if r in self.errors]
        if failed:
            raise RuntimeError(f"{len(failed)} requests failed in transformers' continuous batching: {failed[0]}")
        return [self.records[r] for r in request_ids]

    def run(self, jobs: list[Job], arrivals: list[float] | None = None, *, stream: bool = False) -> list[Record]:
        start = time.perf_counter()
        request_ids = []
        for index, job in enumerate(jobs):
            if arrivals is not None:
                wait_s = start + arrivals[index] - time.perf_counter()
                if wait_s > 0:
                    time.sleep(wait_s)
            request_ids.append(self.send(job, stream=stream))
        return self.wait(request_ids)

    def close(self) -> None:
        try:
            self.manager.stop(block=True, timeout=60.0)
        finally:
            self.stop.set()
            self.reader.join(5.0)


class TransformersCB:
    """The same checkpoint loaded with ``AutoModelForCausalLM.from_pretrained``, served by its own manager."""

    def __init__(self, path: Path, device: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        loaded: Any = AutoModelForCausalLM.from_pretrained(str(path))
        self.model: Any = loaded.to(device).eval()
        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(path))
        config_class: Any = GenerationConfig  # its constructor is untyped
        if not hasattr(self.model, "init_continuous_batching"):
            raise RuntimeError(
                "this transformers has no continuous batching (PreTrainedModel.init_continuous_batching); "
                "transformers >= 5 has it"
            )
        generation = self.model.generation_config
        self.generation_config = config_class(
            max_new_tokens=max(LENGTHS),
            do_sample=False,
            eos_token_id=generation.eos_token_id,
            pad_token_id=generation.pad_token_id,
        )
        self.config_class = _cb_config_class()
        shape = self.model.config
        self.kv_bytes_per_token = (
            2
            * shape.num_hidden_layers
            * shape.num_key_value_heads
            * (shape.hidden_size // shape.num_attention_heads)
            * self.model.dtype.itemsize
        )

    def cb_config(self, *, page_size: int | None, max_sequences: int, longest: int) -> Any:
        """A cache sized for the workload: unset, transformers sizes it from the machine's free memory (90 % of
        it on the CPU); and prefill forwards of at most 4096 tokens, the worker engine's default cap."""
        if self.config_class is None:
            return None
        page = page_size or int(getattr(self.config_class(), "page_size", 256))
        blocks = math.ceil(1.25 * max_sequences * math.ceil(longest / page)) + 4
        options: dict[str, Any] = {"num_blocks": blocks, "max_batch_tokens": 4096}
        if page_size is not None:
            options["page_size"] = page_size
        return self.config_class(**options)

    @contextmanager
    def run(self, *, page_size: int | None = None, max_sequences: int = 64, longest: int = 256) -> Iterator[CBRun]:
        session = CBRun(self, page_size=page_size, max_sequences=max_sequences, longest=longest)
        try:
            yield session
        finally:
            session.close()


def _cb_config_class() -> Any:
    try:
        from transformers import ContinuousBatchingConfig
    except ImportError:
        try:
            from transformers.generation.configuration_utils import ContinuousBatchingConfig
        except ImportError:
            return None  # an older release: the manager sizes its cache itself
    return ContinuousBatchingConfig


def run_transformers(path: Path, device: str, sizes: Sizes, w: Workloads) -> dict[str, Any]:
    """C: every workload through transformers' continuous batching in this process; a fresh manager per run."""
    import torch

    cb = TransformersCB(path, device)
    check_eos_unreachable(cb.model, cb.tokenizer, [job.prompt for job in w.poisson[:3]])
    longest = max(len(cb.tokenizer(job.prompt)["input_ids"]) for job in w.all_jobs()) + max(LENGTHS)
    figures: dict[str, Any] = {
        "label": LABELS["transformers"],
        "device": device,
        "threads": torch.get_num_threads(),
        "attn_implementation": getattr(cb.model.config, "_attn_implementation", None),
        "load_average_1m_at_start": os.getloadavg()[0],
    }
    with cb.run(longest=longest) as session:  # warm-up: first forwards, the paged cache's shapes
        session.run(w.warm)
        session.run(w.warm[:1], stream=True)
    progress("transformers", "lone streamed jobs")
    with cb.run(longest=longest) as session:
        figures["stream_lone"] = stream_figures([session.run([job], stream=True)[0] for job in w.lone_streams])
    figures["poisson"] = {}
    for rate in sizes.rates:
        progress("transformers", f"Poisson {rate:g}/s")
        arrivals = poisson_arrivals(len(w.poisson), rate)
        runs = []
        for _ in range(sizes.repeats):
            with cb.run(longest=longest) as session:
                runs.append(throughput(session.run(w.poisson, arrivals)))
        figures["poisson"][f"{rate:g}"] = median_of(runs)
    progress("transformers", f"{len(w.burst)} at once")
    runs = []
    for _ in range(sizes.repeats):
        with cb.run(longest=longest) as session:
            runs.append(throughput(session.run(w.burst)))
    figures["burst"] = median_of(runs)
    progress("transformers", "streaming")
    runs = []
    for _ in range(sizes.repeats):
        with cb.run(longest=longest) as session:
            runs.append(stream_figures(session.run(w.stream, stream=True)))
    figures["stream_burst"] = median_of(runs)
    progress("transformers", "prefix sharing")
    figures["prefix"] = median_of([prefix_transformers(cb, w) for _ in range(sizes.repeats)])
    return figures


def prefix_transformers(cb: TransformersCB, w: Workloads) -> dict[str, Any]:
    """Each prompt set at once on a fresh manager with pages of 32 tokens: prompt tokens, and those prefilled
    (prompt tokens less the ones its prefix matches reused)."""
    figures: dict[str, Any] = {}
    longest = SYSTEM_TOKENS + 64 + PREFIX_NEW_TOKENS
    for label, jobs in w.prefix.items():
        with cb.run(page_size=PREFIX_PAGE_SIZE, max_sequences=len(jobs), longest=longest) as session:
            counted = session.count_prefix_matches()
            records = session.run(jobs)
            prompt_tokens = sum(r.prompt_tokens for r in records)
            reused = sum(session.matched.get(r.key, 0) for r in records)
        figures[label] = {
            **throughput(records),
            "prompt_tokens": prompt_tokens,
            "prefilled_tokens": prompt_tokens - reused if counted else None,
            "prefilled_source": f"paged cache prefix matches (pages of {PREFIX_PAGE_SIZE})" if counted else None,
            "reused_tokens": reused if counted else None,
        }
    return figures


# --- the run --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workloads:
    """The jobs every way is sent (the same prompts for A, B and C)."""

    warm: list[Job]
    lone: list[Job]
    lone_streams: list[Job]
    poisson: list[Job]
    burst: list[Job]
    stream: list[Job]
    prefix: dict[str, list[Job]]

    def all_jobs(self) -> list[Job]:
        return [
            *self.warm,
            *self.lone,
            *self.lone_streams,
            *self.poisson,
            *self.burst,
            *self.stream,
            *(j for jobs in self.prefix.values() for j in jobs),
        ]


def workloads(tokenizer: Any, sizes: Sizes) -> Workloads:
    pool = workload_prompts(tokenizer, max(sizes.poisson_jobs, sizes.burst_jobs, sizes.stream_jobs, 3))
    warm = [Job(job.prompt, min(job.max_new_tokens, 64)) for job in pool[: sizes.warm_jobs]]
    lone = [Job(pool[i].prompt, n) for i in range(sizes.lone_per_length) for n in LENGTHS]
    return Workloads(
        warm=warm,
        lone=lone,
        lone_streams=[Job(pool[i % len(pool)].prompt, LONE_STREAM_TOKENS) for i in range(sizes.lone_streams)],
        poisson=pool[: sizes.poisson_jobs],
        burst=pool[: sizes.burst_jobs],
        stream=pool[: sizes.stream_jobs],
        prefix=prefix_prompts(tokenizer, sizes.prefix_jobs),
    )


def get(figures: dict[str, Any], *path: str) -> float | None:
    value: Any = figures
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(a: dict[str, Any], b: dict[str, Any], c: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for n in LENGTHS:
        out[f"poisson_3_p50_{n}_A_over_C"] = div(
            get(a, "poisson", "3", "latency", str(n), "p50_ms"), get(c, "poisson", "3", "latency", str(n), "p50_ms")
        )
        out[f"poisson_3_p50_{n}_A_over_B"] = div(
            get(a, "poisson", "3", "latency", str(n), "p50_ms"), get(b, "poisson", "3", "latency", str(n), "p50_ms")
        )
    out["burst_tokens_per_s_A_over_C"] = div(get(a, "burst", "tokens_per_s"), get(c, "burst", "tokens_per_s"))
    out["burst_tokens_per_s_A_over_B"] = div(get(a, "burst", "tokens_per_s"), get(b, "burst", "tokens_per_s"))
    out["burst_p50_16_A_over_C"] = div(
        get(a, "burst", "latency", "16", "p50_ms"), get(c, "burst", "latency", "16", "p50_ms")
    )
    noop, c_ttft = get(a, "noop", "p50_ms"), get(c, "stream_lone", "ttft_p50_ms")
    out["lone_stream_ttft_A_over_noop_plus_C"] = div(
        get(a, "stream_lone", "ttft_p50_ms"), noop + c_ttft if noop is not None and c_ttft is not None else None
    )
    out["stream_burst_ttft_p50_A_over_C"] = div(
        get(a, "stream_burst", "ttft_p50_ms"), get(c, "stream_burst", "ttft_p50_ms")
    )
    for n in LENGTHS:
        out[f"lone_p50_{n}_A_over_B"] = div(get(a, "lone", str(n), "p50_ms"), get(b, "lone", str(n), "p50_ms"))
    out["prefix_prefilled_shared_over_distinct_A"] = div(
        get(a, "prefix", "shared", "prefilled_tokens"), get(a, "prefix", "distinct", "prefilled_tokens")
    )
    return out


def target_met(key: str, value: float | None) -> bool | None:
    if value is None:
        return None
    sign, bound = TARGETS[key]
    return value <= bound if sign == "<=" else value >= bound


def cell(figures: dict[str, Any], *path: str, fmt: str = "{:.1f}") -> str:
    value = get(figures, *path)
    return "n/a" if value is None else fmt.format(value)


def pair(figures: dict[str, Any], *path: str) -> str:
    """``p50 / p99`` of the latency figures at ``path``."""
    return f"{cell(figures, *path, 'p50_ms')} / {cell(figures, *path, 'p99_ms')}"


def skipped(figures: dict[str, Any], key: str) -> str | None:
    part = figures.get(key)
    return str(part["skipped"]) if isinstance(part, dict) and "skipped" in part else None


def render_markdown(report: dict[str, Any]) -> str:
    a, b, c, r, host = report["A"], report["B"], report["C"], report["ratios"], report["machine"]
    sizes, model = report["sizes"], report["model"]

    def row(label: str, cells: tuple[str, ...]) -> str:
        return f"| {label} | " + " | ".join(cells) + " |"

    rows = []
    for rate in (f"{rate:g}" for rate in sizes["rates"]):
        for n in LENGTHS:
            path: tuple[str, ...] = ("poisson", rate, "latency", str(n))
            rows.append(
                row(
                    f"Poisson {rate}/s, {n} tokens: time to done p50 / p99 (ms)",
                    (pair(a, *path), pair(b, *path), pair(c, *path)),
                )
            )
    burst = sizes["burst_jobs"]
    rows.append(row(f"{burst} at once: output tokens/s", tuple(cell(f, "burst", "tokens_per_s") for f in (a, b, c))))
    for n in LENGTHS:
        path = ("burst", "latency", str(n))
        rows.append(
            row(
                f"{burst} at once, {n} tokens: time to done p50 / p99 (ms)",
                (pair(a, *path), pair(b, *path), pair(c, *path)),
            )
        )
    rows.append(
        row(
            f"{burst} at once: mean batch (worker's `timings.batch_size`)",
            (cell(a, "burst", "mean_batch"), cell(b, "burst", "mean_batch"), ""),
        )
    )
    streams = sizes["stream_jobs"]
    rows.append(
        row(
            f"{streams} streamed at once: time to first token p50 / p99 (ms)",
            (
                f"{cell(a, 'stream_burst', 'ttft_p50_ms')} / {cell(a, 'stream_burst', 'ttft_p99_ms')}",
                "",
                f"{cell(c, 'stream_burst', 'ttft_p50_ms')} / {cell(c, 'stream_burst', 'ttft_p99_ms')}",
            ),
        )
    )
    rows.append(
        row(
            f"{streams} streamed at once: inter-token latency p50 (ms)",
            (
                cell(a, "stream_burst", "itl_p50_ms", fmt="{:.2f}"),
                "",
                cell(c, "stream_burst", "itl_p50_ms", fmt="{:.2f}"),
            ),
        )
    )
    rows.append(
        row(
            f"lone streamed job ({LONE_STREAM_TOKENS} tokens): time to first token p50 / p99 (ms)",
            (
                f"{cell(a, 'stream_lone', 'ttft_p50_ms')} / {cell(a, 'stream_lone', 'ttft_p99_ms')}",
                "",
                f"{cell(c, 'stream_lone', 'ttft_p50_ms')} / {cell(c, 'stream_lone', 'ttft_p99_ms')}",
            ),
        )
    )
    rows.append(
        row(
            "lone streamed job: inter-token latency p50 (ms)",
            (
                cell(a, "stream_lone", "itl_p50_ms", fmt="{:.2f}"),
                "",
                cell(c, "stream_lone", "itl_p50_ms", fmt="{:.2f}"),
            ),
        )
    )
    for n in LENGTHS:
        rows.append(
            row(
                f"lone job, {n} tokens, not streamed: time to done p50 / p99 (ms)",
                (pair(a, "lone", str(n)), pair(b, "lone", str(n)), ""),
            )
        )
    rows.append(
        row(
            "no-op Celery round trip (`fleet.diag.noop`) p50 (ms)",
            (cell(a, "noop", "p50_ms", fmt="{:.2f}"), cell(b, "noop", "p50_ms", fmt="{:.2f}"), ""),
        )
    )
    for label in ("shared", "distinct"):
        what = "sharing a 200-token system prompt" if label == "shared" else "distinct 200-token prompts"
        rows.append(
            row(
                f"{sizes['prefix_jobs']} at once, {what}: prompt tokens / prefilled",
                tuple(
                    f"{cell(f, 'prefix', label, 'prompt_tokens', fmt='{:.0f}')} / "
                    f"{cell(f, 'prefix', label, 'prefilled_tokens', fmt='{:.0f}')}"
                    for f in (a, b, c)
                ),
            )
        )
        rows.append(
            row(
                f"{sizes['prefix_jobs']} at once, {what}: wall time (s)",
                tuple(cell(f, "prefix", label, "wall_s", fmt="{:.2f}") for f in (a, b, c)),
            )
        )

    def line(label: str, key: str) -> str:
        value = r.get(key)
        shown = "n/a" if value is None else f"{value:.2f}"
        verdict = ""
        if key in TARGETS:
            sign, bound = TARGETS[key]
            met = target_met(key, value)
            verdict = f" (target {sign} {bound}: {'not measured' if met is None else 'met' if met else 'NOT met'})"
        return f"- {label}: **{shown}**{verdict}"

    targets = [
        *(line(f"Poisson 3/s, {n} tokens, p50: A / C", f"poisson_3_p50_{n}_A_over_C") for n in LENGTHS),
        line(f"{burst} at once, tokens/s: A / C", "burst_tokens_per_s_A_over_C"),
        line(f"{burst} at once, tokens/s: A / B", "burst_tokens_per_s_A_over_B"),
        line(f"{burst} at once, 16-token p50: A / C", "burst_p50_16_A_over_C"),
        line(
            "lone streamed first token: A / (no-op round trip + C's lone first token)",
            "lone_stream_ttft_A_over_noop_plus_C",
        ),
        *(line(f"lone job, {n} tokens, p50: A / B", f"lone_p50_{n}_A_over_B") for n in LENGTHS),
        *(line(f"Poisson 3/s, {n} tokens, p50: A / B", f"poisson_3_p50_{n}_A_over_B") for n in LENGTHS),
        line(f"{streams} streamed at once, first token p50: A / C", "stream_burst_ttft_p50_A_over_C"),
        line(
            f"{sizes['prefix_jobs']} jobs sharing a 200-token system prompt: A's prefilled tokens / distinct prompts'",
            "prefix_prefilled_shared_over_distinct_A",
        ),
    ]
    notes = []
    if not a.get("engine_observed"):
        notes.append(
            "- The worker of A published no continuous-engine figures (`generation` in its heartbeat stayed empty): "
            "its jobs may have run on the static path, so A and B may measure the same thing."
        )
    for label, figures in (("A", a), ("C", c)):
        for key in ("stream_burst", "stream_lone"):
            why = skipped(figures, key)
            if why:
                notes.append(f"- {label}, {key.replace('_', ' ')}: skipped ({why}).")
    if "skipped" in c:
        notes.append(f"- C skipped: {c['skipped']}.")
    for label, figures in (("A", a), ("B", b)):
        if get(figures, "prefix", "shared", "prefilled_tokens") is None:
            notes.append(
                f"- {label}, prefix sharing: the worker published no prompt-token count, so prefilled is n/a; the "
                "worker's engines have no prefix cache, so every prompt token is prefilled (shared / distinct = 1.0, "
                "computed, not observed)."
            )
    shared, distinct = get(c, "prefix", "shared", "prefilled_tokens"), get(c, "prefix", "distinct", "prefilled_tokens")
    if shared is not None and distinct:
        notes.append(f"- C, prefix sharing: prefilled shared / distinct = {shared / distinct:.2f}.")
    short = sum(int(get(f, *path) or 0) for f in (a, b, c) for path in (("burst", "short_jobs"),))
    if short:
        notes.append(f"- {short} jobs of the {burst}-at-once runs ended before max_new_tokens (an end token).")
    versions = ", ".join(f"{name} {version}" for name, version in host["versions"].items())
    loads = " / ".join(cell(f, "load_average_1m_at_start", fmt="{:.2f}") for f in (a, b, c))
    shape = model["shape"]
    return "\n".join(
        [
            f"# Generation serving, continuous engine vs static path vs transformers: {host['name']}, {report['date']}",
            "",
            f"`{model['id']}`: a random-weight Llama, {shape['layers']} layers x {shape['hidden']} (intermediate "
            f"{shape['intermediate']}, {shape['heads']} heads), {model['dtype']}, the demo tokenizer; greedy, "
            f"every job exactly its max_new_tokens (16 / 64 / 192, cycling), prompts of 16-40 tokens. A and B: one "
            "fresh `gpufleet worker --cpu` each on a private redis-server, the model loaded and warmed, jobs on the "
            "worker's direct queue; C: `init_continuous_batching` in the benchmark's process, a fresh manager per "
            f"run. Median of {sizes['repeats']} run(s) per figure; time to done is from the send to the result's "
            "publication (C: its finished output).",
            "",
            f"| what | {LABELS['continuous']} | {LABELS['static']} | {LABELS['transformers']} |",
            "|---|---:|---:|---:|",
            *rows,
            "",
            *targets,
            "",
            *notes,
            *([""] if notes else []),
            f"Machine: {host['cpu']}, {host['cores']} cores, Python {host['python']}; {versions}. Load average "
            f"(1 min) at the start of A / B / C: {loads} (others share the machine).",
            "",
            f"Reproduce: `{report['command']}`",
            "",
        ]
    )


def chart(report: dict[str, Any], path: Path) -> None:
    """Poisson 3/s p50 by length, 48-at-once tokens/s and the streamed first-token times, A / B / C side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ways = [("A", report["A"], "#2f7ed8"), ("B", report["B"], "#9aa5b1"), ("C", report["C"], "#f28f43")]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    width = 0.27
    for offset, (label, figures, color) in enumerate(ways):
        values = [get(figures, "poisson", "3", "latency", str(n), "p50_ms") or 0.0 for n in LENGTHS]
        axes[0].bar([i + (offset - 1) * width for i in range(len(LENGTHS))], values, width, label=label, color=color)
    axes[0].set_xticks(range(len(LENGTHS)), [f"{n} tokens" for n in LENGTHS])
    axes[0].set_title("Poisson 3/s: time to done p50 (ms)")
    axes[0].legend()
    values = [get(figures, "burst", "tokens_per_s") or 0.0 for _, figures, _ in ways]
    bars = axes[1].bar([label for label, _, _ in ways], values, color=[color for _, _, color in ways])
    axes[1].bar_label(bars, fmt="%.0f")
    axes[1].set_title(f"{report['sizes']['burst_jobs']} at once: tokens/s")
    axes[1].set_ylim(0, max([*values, 1.0]) * 1.2)
    streamed = [(label, figures, color) for label, figures, color in ways if label != "B"]
    for offset, (label, figures, color) in enumerate(streamed):
        values = [get(figures, key, "ttft_p50_ms") or 0.0 for key in ("stream_lone", "stream_burst")]
        axes[2].bar([i + (offset - 0.5) * width for i in range(2)], values, width, label=label, color=color)
    axes[2].set_xticks(range(2), ["lone", f"{report['sizes']['stream_jobs']} at once"])
    axes[2].set_title("streamed: first token p50 (ms)")
    axes[2].legend()
    figure.suptitle(f"gpufleet generation serving, {report['machine']['name']}, {report['date']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="one repeat, 24 Poisson jobs, one arrival rate")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # development: 2 x 128, a few jobs
    parser.add_argument("--gpu", type=int, default=None, help="serve on this GPU (default: the CPU)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON, markdown and chart")
    parser.add_argument(
        "--models",
        type=Path,
        default=Path(tempfile.gettempdir()) / "gpufleet-generation-models",
        help="model root for the benchmark's model (created on first run, reused after)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as transformers_logging

    hf_logging: Any = transformers_logging
    hf_logging.disable_progress_bar()
    from gpufleet.workers.tools.tokenizer import demo_tokenizer

    sizes = QUICK if args.quick else FULL
    shape = TINY_SHAPE if args.tiny else SHAPE
    if args.tiny:
        sizes = tiny(sizes)
    models = args.models.resolve()
    started, load_start = time.monotonic(), os.getloadavg()[0]
    model, path = make_model(models, shape)
    w = workloads(demo_tokenizer(), sizes)
    device = f"cuda:{args.gpu}" if args.gpu is not None else "cpu"
    try:
        c_figures = run_transformers(path, device, sizes, w)
    except (AttributeError, TypeError, RuntimeError, ImportError) as exc:  # an API this code does not know
        print(f"transformers' continuous batching skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
        c_figures = {"label": LABELS["transformers"], "skipped": f"{type(exc).__name__}: {exc}"}
    with tempfile.TemporaryDirectory(prefix="gpufleet-generation-") as scratch:
        figures = {mode: run_mode(mode, model, models, Path(scratch), sizes=sizes, w=w, gpu=args.gpu) for mode in MODES}
    host = machine()
    if args.gpu is not None:
        host["name"] = machine_name(f"cuda:{args.gpu}")
    command = "python -m benchmarks.generation_bench" + (" --quick" if args.quick else "")
    command += (" --tiny" if args.tiny else "") + (f" --gpu {args.gpu}" if args.gpu is not None else "")
    report: dict[str, Any] = {
        "machine": host,
        "date": dt.date.today().isoformat(),
        "command": command,
        "model": {"id": model, "shape": vars(shape), "dtype": "float32", "path": str(path)},
        "sizes": vars(sizes),
        "lengths": list(LENGTHS),
        "A": figures["continuous"],
        "B": figures["static"],
        "C": c_figures,
        "ratios": ratios(figures["continuous"], figures["static"], c_figures),
        "targets": {key: {"sign": sign, "bound": bound} for key, (sign, bound) in TARGETS.items()},
        "wall_s": time.monotonic() - started,
        "load_average_1m": {"start": load_start, "end": os.getloadavg()[0]},
    }
    report["met"] = {key: target_met(key, report["ratios"][key]) for key in TARGETS}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"generation-{host['name']}-{report['date']}{'-tiny' if args.tiny else ''}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(render_markdown(report))
    chart(report, stem.with_suffix(".png"))
    print(render_markdown(report))
    print(f"wrote {stem}.json, .md and .png", file=sys.stderr)
    return 0 if all(report["met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
