"""``gpufleet demo``: start a private Redis and a worker, serve real embed and generate jobs, print them; then the
same fleet through ``gpufleet api``'s OpenAI-compatible endpoints.

Everything it starts is its own (a redis-server on a free port, a worker subprocess) and is stopped at the end
unless ``--keep`` is given. Models are created under ``<workdir>/models`` on first run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from gpufleet.tasks.client import FleetClient
from gpufleet.tasks.settings import load_settings
from gpufleet.workers.tools.launch import gpufleet_command, spawn_worker, stop_process, wait_until_ready
from gpufleet.workers.tools.local_redis import LocalRedis, free_port

EMBED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
CHAT_MODEL = "gpufleet/tiny-chat"
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market fell sharply today.",
]


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _timings(result: dict[str, Any]) -> str:
    t = result["timings"]
    wait = "n/a" if t["queue_wait_s"] is None else f"{t['queue_wait_s'] * 1000:.1f} ms"
    return (
        f"queue wait {wait}, load {t['load_s'] * 1000:.1f} ms, compute {t['compute_s'] * 1000:.1f} ms, "
        f"total {t['total_s'] * 1000:.1f} ms on {result['worker']} ({result['device']})"
    )


def _post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    return urllib.request.urlopen(request, timeout=120)


def _openai_api(env: dict[str, str], workdir: Path) -> None:
    """Step 6: ``gpufleet api`` over the same fleet, called as an OpenAI client would (plain HTTP here)."""
    import importlib.util

    if importlib.util.find_spec("fastapi") is None:
        print("[6/6] skipped: the OpenAI-compatible API needs gpufleet[api] (pip install 'gpufleet[api]')")
        return
    port = free_port()
    log_path = workdir / "api.log"
    with log_path.open("ab") as log:
        api = subprocess.Popen(
            [*gpufleet_command(), "api", "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop_process signals the group
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/healthz", timeout=2).close()
                break
            except OSError:
                if api.poll() is not None or time.monotonic() > deadline:
                    print(f"[6/6] gpufleet api did not start; see {log_path}")
                    return
                time.sleep(0.2)
        print(f"[6/6] the OpenAI-compatible API: {base}/v1 (gpufleet api; log: {log_path})")
        with _post(f"{base}/v1/embeddings", {"model": EMBED_MODEL, "input": SENTENCES[:2]}) as answer:
            embedded = json.load(answer)
        print(
            f"      POST /v1/embeddings -> {len(embedded['data'])} vectors of {len(embedded['data'][0]['embedding'])}, "
            f"usage {embedded['usage']}, worker {embedded['gpufleet']['worker']}"
        )
        chat = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 12}
        pieces: list[str] = []
        with _post(f"{base}/v1/chat/completions", {**chat, "stream": True}) as stream:
            for line in stream:
                data = line.decode().strip().removeprefix("data: ")
                if data and data != "[DONE]":
                    choices = json.loads(data)["choices"]
                    if choices and choices[0]["delta"].get("content"):
                        pieces.append(choices[0]["delta"]["content"])
        print(f"      POST /v1/chat/completions (stream) -> {len(pieces)} deltas: {''.join(pieces)!r}")
    finally:
        stop_process(api)


def run_demo(*, workdir: Path, gpu: int | None = None, keep: bool = False) -> int:
    """Run the demo; returns the process exit code."""
    from gpufleet.workers.tools.demo_models import make_demo_models

    workdir = workdir.resolve()
    model_root = workdir / "models"
    print(f"[1/6] demo models in {model_root}")
    for model in make_demo_models(model_root):
        print(f"      {model.model_id} ({model.kind.value}, {model.bytes / 2**20:.1f} MiB)")

    redis = LocalRedis(workdir / "redis").start()
    print(f"[2/6] redis-server on 127.0.0.1:{redis.port} (append-only, password set)")
    env = {
        "GPUFLEET_BROKER_URL": redis.url(0),
        "GPUFLEET_RESULT_BACKEND": redis.url(1),
        "GPUFLEET_MODEL_ROOT": str(model_root),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    name = f"demo-{'gpu' + str(gpu) if gpu is not None else 'cpu'}@gpufleet"
    log_path = workdir / "worker.log"
    worker = spawn_worker(env, log_path, gpu=gpu, name=name)
    try:
        client = FleetClient(
            settings=load_settings(
                broker_url=env["GPUFLEET_BROKER_URL"],
                result_backend=env["GPUFLEET_RESULT_BACKEND"],
                model_root=model_root,
            )
        )
        started = time.perf_counter()
        status = wait_until_ready(client, name, worker, log_path)
        print(
            f"[3/6] worker {name} ready in {time.perf_counter() - started:.1f} s "
            f"on {status['device']} (queues: {', '.join(status['queues'])}; log: {log_path})"
        )
        # Route onto the fleet we actually have: this one worker's GPU type.
        client = FleetClient(
            settings=load_settings(
                broker_url=env["GPUFLEET_BROKER_URL"],
                result_backend=env["GPUFLEET_RESULT_BACKEND"],
                model_root=model_root,
                fleet={"gpu_types": (status["gpu_type"],)},
            )
        )

        print(f"[4/6] fleet.embed {EMBED_MODEL}")
        for attempt in ("cold", "warm"):
            result = client.embed(EMBED_MODEL, SENTENCES).get(timeout=300)
            print(f"      {attempt}: dim {result['dim']}, {_timings(result)}")
        vectors = result["embeddings"]
        for i in range(1, len(SENTENCES)):
            print(f"      cos({SENTENCES[0]!r}, {SENTENCES[i]!r}) = {_cosine(vectors[0], vectors[i]):.3f}")

        print(f"[5/6] fleet.generate {CHAT_MODEL} (random weights: the text is noise, the path is real)")
        result = client.generate(CHAT_MODEL, prompt="The fleet serves", max_new_tokens=16).get(timeout=300)
        print(f"      prompt -> {result['text']!r}")
        print(
            f"      tokens: prompt {result['prompt_tokens']}, completion {result['completion_tokens']} "
            f"({result['finish_reason']}); {_timings(result)}"
        )
        chat = [{"role": "user", "content": "Hello! Who are you?"}]
        result = client.generate(CHAT_MODEL, messages=chat, max_new_tokens=16).get(timeout=300)
        print(f"      chat   -> {result['text']!r}")
        print(
            f"      tokens: prompt {result['prompt_tokens']}, completion {result['completion_tokens']}; "
            f"{_timings(result)}"
        )
        cache = client.status("cache_status").get(name, {}).get("stats", {})
        print(
            f"      cache: hits {cache.get('hits')}, misses {cache.get('misses')}, evictions {cache.get('evictions')}"
        )
        _openai_api(env, workdir)
        if keep:
            print(
                f"kept running: export GPUFLEET_BROKER_URL={env['GPUFLEET_BROKER_URL']} "
                f"GPUFLEET_RESULT_BACKEND={env['GPUFLEET_RESULT_BACKEND']}; worker pid {worker.pid}"
            )
        return 0
    finally:
        if not keep:
            stop_process(worker)
            redis.stop()
