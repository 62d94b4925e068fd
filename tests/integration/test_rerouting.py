"""Jobs a worker gives away, end to end, on two real `gpufleet worker --cpu` processes sharing one Redis database:
after an out-of-memory error, for a model its budget cannot hold, from the fleet's entry queue, and while it stops.

``cpu-s`` has a 16 MiB budget (it could hold the tiny ``org/a``, never MiniLM) and runs out of memory on the check
forward of every load of ``org/a``; ``cpu-b`` has the default budget and takes one job at a time (batching off), so
a sleep on it keeps what is sent to it waiting where the test can see it. Issue 21, items 1 to 4 and 6.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from gpufleet.tasks.client import FleetClient
from gpufleet.tasks.contracts import Rerouted
from gpufleet.tasks.fleet import FleetRegistry, FleetSnapshot, WorkerRecord
from gpufleet.tasks.live_routing import route_live
from gpufleet.tasks.settings import Settings, load_settings
from gpufleet.workers.tools.checkpoints import make_checkpoint
from gpufleet.workers.tools.launch import gpufleet_command, spawn_worker, stop_process, tail, wait_until_ready
from gpufleet.workers.tools.local_redis import LocalRedis

pytestmark = pytest.mark.integration

EMBED = "sentence-transformers/all-MiniLM-L6-v2"  # 86.7 MiB: more than cpu-s's budget
TINY = "org/a"  # 2.5 MB
BROKER_DB = 56
S, B = "cpu-s@reroute", "cpu-b@reroute"


@dataclass
class Fleet:
    client: FleetClient
    settings: Settings
    registry: FleetRegistry
    env: dict[str, str]  # what a producer on this fleet sets
    processes: dict[str, subprocess.Popen[bytes]]
    logs: dict[str, Path]

    def wait_for(self, what: str, check: Callable[[], bool], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.05)
        logs = "\n".join(f"--- {name}\n{tail(path)}" for name, path in self.logs.items())
        pytest.fail(f"never saw {what} within {timeout_s:g} s:\n{logs}")

    def record(self, name: str) -> WorkerRecord | None:
        return self.registry.snapshot(max_age_s=0).get(name)

    def busy(self, name: str, seconds: float) -> Any:
        """Hold ``name``'s pool child for ``seconds`` (what is sent to it meanwhile waits on its direct queue)."""
        job = self.client.app.send_task("fleet.diag.sleep", kwargs={"seconds": seconds}, queue=f"cpu.{name}")

        def running() -> bool:
            record = self.record(name)
            return record is not None and record.running_job is not None and record.running_job.id == job.id

        self.wait_for(f"{name} running the sleep", running)
        return job


@pytest.fixture(scope="module")
def fleet(redis_server: LocalRedis, model_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("reroute-models")
    shutil.copytree(model_root / EMBED, root / EMBED)
    make_checkpoint(root / TINY, "llama")
    broker, backend = redis_server.url(BROKER_DB), redis_server.url(BROKER_DB + 1)
    env = {
        "GPUFLEET_BROKER_URL": broker,
        "GPUFLEET_RESULT_BACKEND": backend,
        "GPUFLEET_MODEL_ROOT": str(root),
        "GPUFLEET_GPU__WARMUP__SIZE": "small",
        "GPUFLEET_FLEET__HEARTBEAT_INTERVAL_S": "0.5",
        "GPUFLEET_FLEET__HEARTBEAT_TTL_S": "2",
        "GPUFLEET_FLEET__REGISTRY_CACHE_S": "0.2",
        "HF_HUB_OFFLINE": "1",
    }
    workers = {
        S: {
            "GPUFLEET_GPU__MEMORY_POOL__BUDGET_BYTES": str(16 * 2**20),
            "GPUFLEET_DIAGNOSTICS": "true",
            "GPUFLEET_FAULTS": f"oom:load:{TINY}:999",
        },
        B: {"GPUFLEET_BATCHING__ENABLED": "false", "GPUFLEET_DIAGNOSTICS": "true"},
    }
    registry = FleetRegistry(broker, cache_s=0.0)
    registry._client.flushdb()
    redis.Redis.from_url(backend).flushdb()
    settings = load_settings(
        broker_url=broker, result_backend=backend, model_root=root, fleet={"registry_cache_s": 0.2}, diagnostics=True
    )
    client = FleetClient(settings=settings)
    logs_dir = tmp_path_factory.mktemp("reroute-logs")
    logs = {name: logs_dir / f"{name}.log" for name in workers}
    processes = {name: spawn_worker({**env, **extra}, logs[name], name=name) for name, extra in workers.items()}
    try:
        for name, process in processes.items():
            wait_until_ready(client, name, process, logs[name])
        running = Fleet(client, settings, registry, env, processes, logs)
        running.wait_for(
            "both workers ready", lambda: {w.name for w in registry.snapshot(max_age_s=0).ready()} == {S, B}
        )
        yield running
    finally:
        for process in processes.values():
            stop_process(process)


def rerouted(fleet: Fleet, job_id: str) -> Rerouted | None:
    return Rerouted.from_meta(fleet.client.app.backend.get_task_meta(job_id))


def test_an_oom_reroute_goes_to_a_live_worker_with_more_memory_and_the_cli_says_where(fleet: Fleet) -> None:
    """Items 1 and 2: the repro of the issue (`--queue cpu.<the OOMing worker>`) through `gpufleet submit`."""
    # The re-sent job waits on cpu-b's direct queue until the sleep ends: long enough for the CLI (seconds to
    # start) to see where it went.
    sleeper = fleet.busy(B, 8)
    command = [*gpufleet_command(), "submit", "generate", TINY, "--prompt", "hi", "--max-new-tokens", "4"]
    command += ["--queue", f"cpu.{S}", "--timeout", "120"]
    done = subprocess.run(
        command, env={**os.environ, **fleet.env}, capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{tail(fleet.logs[S])}"
    assert json.loads(done.stdout)["worker"] == B, "served by the live worker with more memory"
    assert f"was re-sent by {S} to queue 'cpu.{B}': out of memory on {S}" in done.stderr, done.stderr
    assert "still running" not in done.stderr and "gpu.t4" not in tail(fleet.logs[S], 200)
    assert sleeper.get(timeout=30)["slept_s"] >= 8


def test_a_model_too_big_for_the_worker_that_took_it_from_the_shared_queue_is_forwarded_once(fleet: Fleet) -> None:
    """Item 3: cpu-b is busy, so cpu-s takes the jobs from `cpu`; it cannot hold MiniLM and forwards them."""
    sleeper = fleet.busy(B, 3)
    jobs = [fleet.client.embed(EMBED, [f"too big for cpu-s {i}"], queue="cpu") for i in range(3)]
    fleet.wait_for("a job forwarded to cpu-b", lambda: any(rerouted(fleet, job.id) for job in jobs))
    moved = next(where for job in jobs if (where := rerouted(fleet, job.id)) is not None)
    assert (moved.worker, moved.rerouted_to) == (S, f"cpu.{B}") and "cannot hold it" in moved.reason
    assert [job.get(timeout=120)["worker"] for job in jobs] == [B, B, B], "none failed with CapacityError"
    assert sleeper.get(timeout=30)["slept_s"] >= 3


def test_a_plain_celery_client_without_a_queue_is_routed_through_the_fleet_entry_queue(fleet: Fleet) -> None:
    """Item 4: the README's plain client, with ``task_default_queue="fleet"`` and no ``queue=``."""
    plain = Celery(broker=fleet.env["GPUFLEET_BROKER_URL"], backend=fleet.env["GPUFLEET_RESULT_BACKEND"])
    plain.conf.update(
        task_serializer="json", accept_content=["json"], result_accept_content=["json"], task_default_queue="fleet"
    )
    try:
        jobs = [plain.send_task("fleet.embed", kwargs={"model": EMBED, "texts": [f"plain {i}"]}) for i in range(4)]
        # Whichever worker took each from `fleet`, it went where the router sends it: the one that can hold it.
        assert [job.get(timeout=120)["worker"] for job in jobs] == [B] * 4
        missing = plain.send_task("fleet.embed", kwargs={"model": "org/missing", "texts": ["x"]})
        with pytest.raises(Exception) as raised:
            missing.get(timeout=60)
        assert type(raised.value).__name__ == "ModelNotFoundError", raised.value
        # A job the router leaves alone (no model) runs on the worker that took it from `fleet`.
        assert plain.send_task("fleet.diag.sleep", kwargs={"seconds": 0}).get(timeout=60)["worker"] in (S, B)
        broker = redis.Redis.from_url(fleet.env["GPUFLEET_BROKER_URL"])
        assert broker.llen("fleet") == 0 and broker.llen("celery") == 0
    finally:
        plain.close()


def test_a_gracefully_stopping_worker_drains_at_once_and_beats_for_its_running_job(fleet: Fleet) -> None:
    """Item 6 (stops cpu-b: the last test of the module)."""
    sleeper = fleet.busy(B, 6)
    os.kill(fleet.processes[B].pid, signal.SIGTERM)  # warm shutdown of the worker's parent
    stopped_at = time.monotonic()
    fleet.wait_for(f"{B} draining", lambda: (r := fleet.record(B)) is not None and r.draining, timeout_s=5)
    assert time.monotonic() - stopped_at < 2, "marked at once, not when its job ends"

    def routed_away(snapshot: FleetSnapshot) -> bool:
        decision = route_live(TINY, snapshot, fleet.settings)
        return decision.worker != B and B not in decision.queue

    assert routed_away(fleet.registry.snapshot(max_age_s=0)), "the router skips a draining worker"
    time.sleep(float(fleet.env["GPUFLEET_FLEET__HEARTBEAT_TTL_S"]) + 1)  # past the TTL of its beat before the signal
    still = fleet.record(B)
    exited = fleet.processes[B].poll()
    assert still is not None and still.draining and still.running_job is not None, (
        f"it beats on for its job (exit code {exited}):\n{tail(fleet.logs[B])}"
    )
    assert sleeper.get(timeout=30)["slept_s"] >= 6, "its running job finishes"
    fleet.wait_for(f"{B} gone", lambda: fleet.record(B) is None, timeout_s=20)
