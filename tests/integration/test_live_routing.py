"""Routing on the live fleet, end to end: two real `gpufleet worker --cpu` processes on one Redis database, their
real heartbeats in the registry, and a producer (FleetClient, `gpufleet plan --live`) that sends each job to the
worker already holding its model, and a model held nowhere to the `cpu` type queue, with no GPU types set."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpufleet.tasks.client import FleetClient, route_of
from gpufleet.tasks.fleet import FleetRegistry, FleetSnapshot
from gpufleet.tasks.names import worker_queue
from gpufleet.tasks.settings import Settings, load_settings
from gpufleet.workers.tools.launch import gpufleet_command, spawn_worker, stop_process, tail, wait_until_ready
from gpufleet.workers.tools.local_redis import LocalRedis

pytestmark = pytest.mark.integration

EMBED = "sentence-transformers/all-MiniLM-L6-v2"
CHAT = "gpufleet/tiny-chat"
BROKER_DB = 50  # one database for both workers: they share the cpu type queue and the registry
A, B = "cpu-a@live", "cpu-b@live"


@dataclass
class LiveFleet:
    client: FleetClient
    settings: Settings
    registry: FleetRegistry
    env: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]]
    logs: dict[str, Path]

    def wait_for(self, what: str, check: Callable[[FleetSnapshot], bool], timeout_s: float = 60.0) -> None:
        """Poll the registry (uncached) until ``check`` holds: heartbeats come every interval, not at once."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check(self.registry.snapshot(max_age_s=0)):
                return
            time.sleep(0.1)
        logs = "\n".join(f"--- {name}\n{tail(path)}" for name, path in self.logs.items())
        pytest.fail(f"the registry never showed {what} within {timeout_s:g} s:\n{logs}")


def holds(name: str, model: str) -> Callable[[FleetSnapshot], bool]:
    def check(snapshot: FleetSnapshot) -> bool:
        record = snapshot.get(name)
        return record is not None and record.ready and record.holds(model) == "resident"

    return check


@pytest.fixture(scope="module")
def live_fleet(
    redis_server: LocalRedis, model_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveFleet]:
    broker, backend = redis_server.url(BROKER_DB), redis_server.url(BROKER_DB + 1)
    env = {
        "GPUFLEET_BROKER_URL": broker,
        "GPUFLEET_RESULT_BACKEND": backend,
        "GPUFLEET_MODEL_ROOT": str(model_root),
        "GPUFLEET_GPU__WARMUP__SIZE": "small",
        # Beats every half second (TTL 2 s), so the test sees a load or a stop within a second or two.
        "GPUFLEET_FLEET__HEARTBEAT_INTERVAL_S": "0.5",
        "GPUFLEET_FLEET__HEARTBEAT_TTL_S": "2",
        "GPUFLEET_FLEET__REGISTRY_CACHE_S": "0.2",
        "HF_HUB_OFFLINE": "1",
    }  # no GPUFLEET_FLEET__GPU_TYPES: a newcomer's CPU-only fleet, as the README starts it
    # The producer, as a newcomer's: nothing about the fleet configured, only where the broker and models are.
    settings = load_settings(
        broker_url=broker, result_backend=backend, model_root=model_root, fleet={"registry_cache_s": 0.2}
    )
    registry = FleetRegistry(broker, cache_s=0.0)
    registry._client.flushdb()
    client = FleetClient(settings=settings)
    logs_dir = tmp_path_factory.mktemp("live-routing-logs")
    logs = {name: logs_dir / f"{name}.log" for name in (A, B)}
    processes = {name: spawn_worker(env, logs[name], name=name) for name in (A, B)}
    try:
        for name, process in processes.items():
            wait_until_ready(client, name, process, logs[name])
        fleet = LiveFleet(client, settings, registry, env, processes, logs)
        fleet.wait_for("both workers ready", lambda s: {w.name for w in s.ready()} == {A, B})
        yield fleet
    finally:
        for process in processes.values():
            stop_process(process)


def test_a_job_goes_to_the_worker_already_holding_its_model(live_fleet: LiveFleet) -> None:
    client = live_fleet.client
    loaded = client.load_model(EMBED, queue=worker_queue("cpu", B)).get(timeout=180)
    assert loaded["worker"] == B
    live_fleet.wait_for(f"{EMBED} resident on {B}", holds(B, EMBED))
    for _ in range(3):
        result = client.embed(EMBED, ["where does this go?"])
        route = route_of(result)
        assert route is not None and (route.queue, route.worker, route.holding) == (f"cpu.{B}", B, "resident")
        answer = result.get(timeout=120)
        assert answer["worker"] == B and answer["model"] == EMBED


def test_a_model_held_nowhere_goes_to_the_cpu_queue_then_follows_its_worker(live_fleet: LiveFleet) -> None:
    client = live_fleet.client
    live_fleet.wait_for(f"{CHAT} held by no one", lambda s: all(w.holds(CHAT) is None for w in s.live()))
    first = client.generate(CHAT, prompt="hello", max_new_tokens=1)
    route = route_of(first)
    assert route is not None and (route.queue, route.worker, route.gpu_type) == ("cpu", None, "cpu")
    served_by = first.get(timeout=180)["worker"]
    assert served_by in (A, B)
    live_fleet.wait_for(f"{CHAT} resident on {served_by}", holds(served_by, CHAT))
    again = client.generate(CHAT, prompt="hello", max_new_tokens=1)
    assert route_of(again) is not None and route_of(again).worker == served_by  # type: ignore[union-attr]
    assert again.get(timeout=120)["worker"] == served_by


def test_plan_live_shows_the_decision_and_the_fleet(live_fleet: LiveFleet) -> None:
    live_fleet.wait_for(f"{EMBED} resident on {B}", holds(B, EMBED))
    command = [*gpufleet_command(), "plan", "--live", EMBED]
    done = subprocess.run(
        command, env={**os.environ, **live_fleet.env}, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert f"queue: cpu.{B}" in done.stdout and f"worker: {B}" in done.stdout
    assert f"  {A}: 1 x cpu  ready" in done.stdout and f"  {B}: 1 x cpu  ready" in done.stdout
    assert EMBED in done.stdout.split(f"  {B}:")[1]


def test_a_stopped_worker_is_no_longer_targeted(live_fleet: LiveFleet) -> None:
    live_fleet.wait_for(f"{EMBED} resident on {B}", holds(B, EMBED))
    stop_process(live_fleet.processes[B])  # graceful: it removes itself from the registry at once
    live_fleet.wait_for(f"{B} gone", lambda s: s.get(B) is None, timeout_s=10)
    time.sleep(live_fleet.settings.fleet.registry_cache_s)  # the producer's cached fleet expires too
    result = live_fleet.client.embed(EMBED, ["and now?"])
    route = route_of(result)
    assert route is not None and (route.queue, route.worker) == ("cpu", None)
    assert result.get(timeout=180)["worker"] == A
