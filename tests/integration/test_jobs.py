"""Real jobs through a real Redis and a real `gpufleet worker --cpu`, with the real demo models."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import TimeoutError as CeleryTimeout

from tests.integration.conftest import RunningWorker, WorkerFactory

pytestmark = pytest.mark.integration

EMBED = "sentence-transformers/all-MiniLM-L6-v2"
CHAT = "gpufleet/tiny-chat"
RESULT_TIMEOUT_S = 120


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (
        math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    )


def test_embed_captures_meaning(worker: RunningWorker) -> None:
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
    result = worker.client.embed(EMBED, texts).get(timeout=RESULT_TIMEOUT_S)
    assert result["dim"] == 384 and len(result["embeddings"]) == 3
    assert all(abs(math.hypot(*v) - 1.0) < 1e-4 for v in result["embeddings"])
    similar = cosine(result["embeddings"][0], result["embeddings"][1])
    unrelated = cosine(result["embeddings"][0], result["embeddings"][2])
    assert similar > unrelated + 0.3, (similar, unrelated)
    assert result["model"] == EMBED and result["worker"] == worker.name
    assert result["gpu_type"] == "cpu" and result["device"] == "cpu"
    assert result["timings"]["queue_wait_s"] is not None and result["timings"]["queue_wait_s"] >= 0
    assert result["timings"]["compute_s"] > 0


def test_generate_prompt_and_chat(worker: RunningWorker) -> None:
    first = worker.client.generate(CHAT, prompt="The fleet serves", max_new_tokens=12).get(timeout=RESULT_TIMEOUT_S)
    assert first["prompt_tokens"] > 0
    assert 1 <= first["completion_tokens"] <= 12
    assert first["finish_reason"] in ("stop", "length")
    assert first["finish_reason"] == "stop" or first["completion_tokens"] == 12
    again = worker.client.generate(CHAT, prompt="The fleet serves", max_new_tokens=12).get(timeout=RESULT_TIMEOUT_S)
    assert again["text"] == first["text"], "greedy decoding must be deterministic"
    assert again["timings"]["load_s"] == 0.0, "the second job must hit the cache"
    chat = worker.client.generate(
        CHAT,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
        max_new_tokens=8,
    ).get(timeout=RESULT_TIMEOUT_S)
    assert chat["prompt_tokens"] > first["prompt_tokens"]
    assert chat["completion_tokens"] <= 8


def test_plain_celery_client_without_gpufleet(worker: RunningWorker) -> None:
    """A producer with only celery installed: gpufleet's packages (and torch) cannot be imported."""
    script = textwrap.dedent(
        f"""
        import importlib.abc, json, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {{"gpufleet", "torch", "transformers", "pydantic"}}:
                    raise ImportError(name + " is blocked: this client has only celery")
        sys.meta_path.insert(0, Block())
        from celery import Celery
        app = Celery(broker={worker.env["GPUFLEET_BROKER_URL"]!r}, backend={worker.env["GPUFLEET_RESULT_BACKEND"]!r})
        app.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"])
        result = app.send_task("fleet.embed", kwargs={{"model": {EMBED!r}, "texts": ["hello world"]}}, queue="cpu")
        print(json.dumps(result.get(timeout={RESULT_TIMEOUT_S})))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    import json

    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["dim"] == 384 and result["model"] == EMBED and result["worker"] == worker.name
    assert result["timings"]["queue_wait_s"] is None  # a foreign producer sends no timestamp


BAD_REQUESTS: list[tuple[str, dict[str, Any], str]] = [
    ("fleet.embed", {"model": "org/absent", "texts": ["x"]}, "ModelNotFoundError"),
    ("fleet.embed", {"model": "../../etc/passwd", "texts": ["x"]}, "InvalidRequestError"),
    ("fleet.embed", {"model": EMBED, "texts": "not a list"}, "InvalidRequestError"),
    ("fleet.embed", {"model": EMBED, "texts": []}, "InvalidRequestError"),
    ("fleet.embed", {"model": EMBED, "texts": ["x"], "pooling": "max"}, "InvalidRequestError"),
    ("fleet.generate", {"model": CHAT, "prompt": "x", "max_new_tokens": -3}, "InvalidRequestError"),
    ("fleet.generate", {"model": CHAT}, "InvalidRequestError"),
    ("fleet.generate", {"model": EMBED, "prompt": "x"}, "InferenceError"),
    ("fleet.embed", {"model": CHAT, "texts": ["x"]}, "InferenceError"),
    ("fleet.unload_model", {"model": "../x"}, "InvalidRequestError"),  # refused, not "not-loaded"
]


@pytest.mark.parametrize(("task", "kwargs", "error"), BAD_REQUESTS)
def test_bad_input_fails_clearly_and_the_worker_keeps_serving(
    worker: RunningWorker, task: str, kwargs: dict[str, Any], error: str
) -> None:
    result = worker.send(task, kwargs=kwargs)
    with pytest.raises(Exception) as raised:
        result.get(timeout=RESULT_TIMEOUT_S)
    assert type(raised.value).__name__ == error, f"{type(raised.value).__name__}: {raised.value}"
    assert len(str(raised.value)) > 20
    ok = worker.client.embed(EMBED, ["still serving"]).get(timeout=RESULT_TIMEOUT_S)
    assert ok["dim"] == 384


def test_positional_arguments_are_refused(worker: RunningWorker) -> None:
    result = worker.send("fleet.embed", args=[EMBED, ["x"]])
    with pytest.raises(Exception, match="keyword arguments only"):
        result.get(timeout=RESULT_TIMEOUT_S)


def test_load_unload_and_status(worker: RunningWorker) -> None:
    loaded = worker.client.load_model(CHAT, priority=True).get(timeout=RESULT_TIMEOUT_S)
    assert loaded["action"] in ("loaded", "already-loaded") and loaded["pinned"] is True
    assert loaded["bytes"] > 0
    models = worker.client.status("models_status")[worker.name]
    entries = {entry["model"]: entry for entry in models["loaded"]}
    assert entries[CHAT]["pinned"] is True
    gpu = worker.client.status("gpu_status")[worker.name]
    assert gpu["ready"] is True and gpu["warm"] is True
    assert gpu["memory_pool"]["budget_bytes"] > 0
    cache = worker.client.status("cache_status")[worker.name]
    assert cache["stats"]["entries"] >= 1
    unloaded = worker.client.unload_model(CHAT).get(timeout=RESULT_TIMEOUT_S)
    assert unloaded["action"] == "unloaded" and unloaded["bytes"] > 0
    again = worker.client.unload_model(CHAT).get(timeout=RESULT_TIMEOUT_S)
    assert again["action"] == "not-loaded"


def test_status_cli(worker: RunningWorker) -> None:
    import json
    import os

    from gpufleet.workers.tools.launch import gpufleet_command

    def status(*flags: str) -> object:
        done = subprocess.run(
            [*gpufleet_command(), "status", "--json", *flags],
            env={**os.environ, **worker.env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    records = status()  # the fleet registry the heartbeats fill
    assert isinstance(records, list)
    mine = [record for record in records if record["name"] == worker.name]
    assert mine and mine[0]["ready"] is True and mine[0]["memory_budget_bytes"] > 0
    report = status("--control")  # the workers' own answers to the control commands
    assert isinstance(report, dict) and set(report) == {"gpu_status", "models_status", "cache_status"}
    assert report["gpu_status"][worker.name]["ready"] is True
    # One broadcast that stops at the live workers' count (it took three sequential ones, 6.6 s, before), and a
    # rounded hit ratio.
    started = time.monotonic()
    done = subprocess.run(
        [*gpufleet_command(), "status", "--control"],
        env={**os.environ, **worker.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 5.0
    assert re.search(r"hit_ratio=\d\.\d\d \(per job\)", done.stdout), done.stdout


def test_no_result_is_lost_waiting(worker: RunningWorker) -> None:
    """Many jobs at once on a one-process worker: all complete, in order of arrival."""
    results = [worker.client.embed(EMBED, [f"sentence {i}"]) for i in range(8)]
    try:
        dims = [r.get(timeout=RESULT_TIMEOUT_S)["dim"] for r in results]
    except CeleryTimeout:  # pragma: no cover - diagnostic
        pytest.fail("jobs did not complete")
    assert dims == [384] * 8


def test_load_reports_progress_then_the_result(worker_factory: WorkerFactory) -> None:
    worker = worker_factory({"GPUFLEET_FAULTS": "slow:load:2"})
    job = worker.client.load_model(EMBED)
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 120
    while not job.ready() and time.monotonic() < deadline:
        if job.state == "PROGRESS":
            seen.append(dict(job.info))
        time.sleep(0.05)
    result = job.get(timeout=10)
    assert seen, "no PROGRESS state was observed during a 2 s load"
    assert seen[0]["bytes_total"] > 50 * 2**20 and seen[0]["bytes_done"] <= seen[0]["bytes_total"]
    assert result["action"] == "loaded" and result["loader"] == "fast-safetensors"


SERVICE_TASKS = """\
from celery import Celery

app = Celery("tasks", broker="memory://")


@app.task
def add(x, y):
    return x + y
"""

SERVICE_PRODUCER = """\
import json

import gpu
import tasks  # the service's own modules, as in Celery's tutorial: gpufleet must not collide with them
import workers
from gpufleet import FleetClient, InvalidRequestError

assert tasks.add.run(2, 3) == 5 and gpu.NAME == "service gpu" and workers.NAME == "service workers"
client = FleetClient()
result = client.embed(EMBED, ["hello from a service"]).get(timeout=TIMEOUT)
try:
    client.embed(EMBED, [])
except InvalidRequestError as exc:
    refused = str(exc)
print(json.dumps({"dim": result["dim"], "worker": result["worker"], "refused": refused}))
"""


def test_a_service_with_its_own_tasks_module_enqueues_through_gpufleet(worker: RunningWorker, tmp_path: Path) -> None:
    """``from gpufleet import FleetClient`` works beside a service's own tasks.py, workers.py and gpu.py."""
    (tmp_path / "tasks.py").write_text(SERVICE_TASKS)
    (tmp_path / "gpu.py").write_text('NAME = "service gpu"\n')
    (tmp_path / "workers.py").write_text('NAME = "service workers"\n')
    script = SERVICE_PRODUCER.replace("EMBED", repr(EMBED)).replace("TIMEOUT", str(RESULT_TIMEOUT_S))
    (tmp_path / "producer.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({k: v for k, v in worker.env.items() if k.startswith("GPUFLEET_")})
    done = subprocess.run(
        [sys.executable, "producer.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["dim"] == 384 and answer["worker"] == worker.name
    assert "texts" in answer["refused"]
