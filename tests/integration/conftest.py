"""Integration fixtures: workers started as the README says (`gpufleet worker --cpu`) on a real Redis."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gpufleet.tasks.client import FleetClient
from gpufleet.tasks.settings import Settings, load_settings
from gpufleet.workers.tools.launch import spawn_worker, stop_process, wait_until_ready
from gpufleet.workers.tools.local_redis import LocalRedis

# Broker on an even database from 100 up, results on the next one; tests that use a database of their own pick one
# below 100, so a worker never consumes another test's queue.
_db = itertools.count(100, 2)


@dataclass
class RunningWorker:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str]
    client: FleetClient
    settings: Settings

    @property
    def direct_queue(self) -> str:
        return f"cpu.{self.name}"

    def send(self, task: str, queue: str = "cpu", **options: Any) -> Any:
        """Send raw kwargs, bypassing the client's validation (as a foreign producer would)."""
        return self.client.app.send_task(task, queue=queue, **options)


def _worker_env(redis: LocalRedis, model_root: Path, broker_db: int, extra: dict[str, str]) -> dict[str, str]:
    return {
        "GPUFLEET_BROKER_URL": redis.url(broker_db),
        "GPUFLEET_RESULT_BACKEND": redis.url(broker_db + 1),
        "GPUFLEET_MODEL_ROOT": str(model_root),
        "GPUFLEET_FLEET__GPU_TYPES": "cpu",
        "GPUFLEET_GPU__WARMUP__SIZE": "small",
        # Test workers serve fleet.diag.* and take GPUFLEET_FAULTS; production workers do neither.
        "GPUFLEET_DIAGNOSTICS": "true",
        "HF_HUB_OFFLINE": "1",
        **extra,
    }


WorkerFactory = Callable[..., RunningWorker]
TEARDOWN_GRACE_S = 4.0


class WorkerLauncher:
    """Starts CPU workers, each on its own Redis database (so tests never see each other's jobs), and stops
    them together: a fixture's workers live only as long as the fixture, so idle ones never pile up."""

    def __init__(self, redis_server: LocalRedis, model_root: Path, logs: Path) -> None:
        self.redis_server, self.model_root, self.logs = redis_server, model_root, logs
        self.started: list[RunningWorker] = []

    def start(
        self, env: dict[str, str] | None = None, *, wait: bool = True, db: int | None = None, name: str | None = None
    ) -> RunningWorker:
        broker_db = db if db is not None else next(_db)
        full_env = _worker_env(self.redis_server, self.model_root, broker_db, env or {})
        name = name or f"cpu-{broker_db}@test"
        settings = load_settings(
            broker_url=full_env["GPUFLEET_BROKER_URL"],
            result_backend=full_env["GPUFLEET_RESULT_BACKEND"],
            model_root=self.model_root,
            fleet={"gpu_types": ("cpu",)},  # the producer routes onto the CPU fleet these tests run
        )
        client = FleetClient(settings=settings)
        log_path = self.logs / f"{name}.log"
        process = spawn_worker(full_env, log_path, name=name)
        worker = RunningWorker(name, process, log_path, full_env, client, settings)
        self.started.append(worker)
        if wait:
            wait_until_ready(client, name, process, log_path)
        return worker

    def stop_all(self) -> None:
        # SIGTERM to all first, then wait: their warm shutdowns overlap instead of queueing one after another.
        for worker in self.started:
            if worker.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.process.pid, signal.SIGTERM)
        for worker in self.started:
            # A warm shutdown takes about a second; one still going after this is finishing a job its test left
            # running (a long generation, a slow load): the test is over and the worker's database is its own, so
            # it is killed rather than waited for (20 s each, several minutes of a CI run).
            stop_process(worker.process, timeout_s=TEARDOWN_GRACE_S)
        self.started.clear()


@pytest.fixture(scope="session")
def _worker_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("worker-logs")


@pytest.fixture
def worker_factory(redis_server: LocalRedis, model_root: Path, _worker_logs: Path) -> Iterator[WorkerFactory]:
    """Start CPU workers for one test; they stop when it ends."""
    launcher = WorkerLauncher(redis_server, model_root, _worker_logs)
    yield launcher.start
    launcher.stop_all()


@pytest.fixture(scope="module")
def module_worker_factory(redis_server: LocalRedis, model_root: Path, _worker_logs: Path) -> Iterator[WorkerFactory]:
    """Start CPU workers for a module's fixtures; they stop when the module's tests are done."""
    launcher = WorkerLauncher(redis_server, model_root, _worker_logs)
    yield launcher.start
    launcher.stop_all()


@pytest.fixture(scope="session")
def _session_worker_factory(redis_server: LocalRedis, model_root: Path, _worker_logs: Path) -> Iterator[WorkerFactory]:
    launcher = WorkerLauncher(redis_server, model_root, _worker_logs)
    yield launcher.start
    launcher.stop_all()


@pytest.fixture(scope="session")
def worker(_session_worker_factory: WorkerFactory) -> RunningWorker:
    """One shared CPU worker for the tests that only send jobs."""
    return _session_worker_factory()
