"""The live fleet registry with real `gpufleet worker --cpu` processes: heartbeats, a graceful stop, a kill -9
(and its direct queue served by a peer), and the same registry over RabbitMQ (in the result backend's Redis)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import redis

from gpufleet.tasks.fleet import FleetRegistry, WorkerRecord, registry_url
from gpufleet.workers.cli import main
from gpufleet.workers.tools.launch import stop_process
from gpufleet.workers.tools.local_redis import LocalRedis
from tests.integration.conftest import RunningWorker, WorkerFactory
from tests.integration.test_brokers import rabbitmq_up

pytestmark = pytest.mark.integration

EMBED = "sentence-transformers/all-MiniLM-L6-v2"
TTL_S = 4.0
# Short heartbeats so a killed worker drops out within seconds.
FAST = {"GPUFLEET_FLEET__HEARTBEAT_TTL_S": str(TTL_S), "GPUFLEET_FLEET__HEARTBEAT_INTERVAL_S": "1"}
T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], what: str, timeout_s: float = 60.0) -> T:
    """Poll ``probe`` until it returns something; the deadline only bounds a broken run."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def registry_of(worker: RunningWorker) -> FleetRegistry:
    url = registry_url(worker.settings)
    assert url is not None
    return FleetRegistry(url, cache_s=0)


def record_where(registry: FleetRegistry, name: str, check: Callable[[WorkerRecord], bool]) -> WorkerRecord:
    def probe() -> WorkerRecord | None:
        record = registry.snapshot().get(name)
        return record if record is not None and check(record) else None

    return wait_for(probe, f"a heartbeat of {name} that passes the check")


def job_ids_on(broker: redis.Redis, queue: str) -> set[str]:
    return {json.loads(raw)["headers"]["id"] for raw in broker.lrange(queue, 0, -1)}


def embed_on(worker: RunningWorker, queue: str, text: str) -> Any:
    return worker.send("fleet.embed", queue=queue, kwargs={"model": EMBED, "texts": [text]})


def test_heartbeat_shows_models_and_jobs_and_a_graceful_stop_leaves_at_once(
    worker_factory: WorkerFactory, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    worker = worker_factory(FAST)
    registry = registry_of(worker)
    assert worker.client.embed(EMBED, ["hello"]).get(timeout=120)["worker"] == worker.name
    # The job's outcome is counted after its model was loaded: wait for both.
    record = record_where(registry, worker.name, lambda r: bool(r.holds(EMBED) and r.jobs_by_outcome))
    assert record.ready and record.warm and record.gpu_type == "cpu" and record.type_queue == "cpu"
    assert record.direct_queue == worker.direct_queue and record.pid == worker.process.pid
    assert record.memory_used_bytes >= record.resident[0].bytes > 0 and record.memory_budget_bytes > 0
    assert record.jobs_by_outcome == {"fleet.embed|ok": 1} and record.load_s_buckets["+Inf"] >= 1
    assert {"celery", "kombu", "torch", "transformers"} <= record.versions.keys()

    # `gpufleet status` reads the same registry.
    monkeypatch.setenv("GPUFLEET_BROKER_URL", worker.env["GPUFLEET_BROKER_URL"])
    assert main(["status"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{worker.name}  cpu  ready  mem ") and EMBED in line

    # A job running and three waiting on its direct queue show in the heartbeat.
    worker.send("fleet.diag.sleep", queue=worker.direct_queue, kwargs={"seconds": 4})
    record_where(
        registry, worker.name, lambda r: r.running_job is not None and r.running_job.task == "fleet.diag.sleep"
    )
    waiting = {embed_on(worker, worker.direct_queue, f"waiting {i}").id for i in range(3)}
    record_where(registry, worker.name, lambda r: r.backlog == 3)

    stop_process(worker.process)  # SIGTERM to its process group: a warm shutdown
    assert worker.process.returncode == 0
    assert registry.snapshot().get(worker.name) is None, "gone at once, not after the TTL"
    assert worker.name not in registry.expired()
    broker = redis.Redis.from_url(worker.env["GPUFLEET_BROKER_URL"])
    assert broker.llen(worker.direct_queue) == 0, "nothing left on a queue nobody consumes"
    assert waiting <= job_ids_on(broker, "cpu"), "its waiting jobs went back to the type queue"


def test_a_killed_worker_drops_out_and_a_peer_serves_its_direct_queue(worker_factory: WorkerFactory) -> None:
    doomed = worker_factory(FAST)
    same_broker = {key: doomed.env[key] for key in ("GPUFLEET_BROKER_URL", "GPUFLEET_RESULT_BACKEND")}
    peer = worker_factory({**FAST, **same_broker})
    registry = registry_of(doomed)
    record_where(registry, peer.name, lambda r: r.ready)

    sleeper = doomed.send("fleet.diag.sleep", queue=doomed.direct_queue, kwargs={"seconds": 60})
    record_where(registry, doomed.name, lambda r: r.running_job is not None)
    waiting = [embed_on(doomed, doomed.direct_queue, f"stranded? {i}") for i in range(3)]
    last = record_where(registry, doomed.name, lambda r: r.backlog == 3)

    killed_at = time.time()
    os.killpg(doomed.process.pid, signal.SIGKILL)  # the whole worker: parent and pool child, no goodbye
    doomed.process.wait()
    # The sleep comes back too (acks_late): revoked, so the peer drops it instead of sleeping a minute first.
    sleeper.revoke()
    assert last.expires_at <= killed_at + TTL_S, "its last record ran out within the TTL of the kill"
    wait_for(lambda: registry.snapshot().get(doomed.name) is None, f"{doomed.name} to drop out")

    results = [job.get(timeout=120) for job in waiting]
    assert [result["worker"] for result in results] == [peer.name] * 3, "the peer served the dead worker's jobs"
    broker = redis.Redis.from_url(doomed.env["GPUFLEET_BROKER_URL"])
    assert broker.llen(doomed.direct_queue) == 0
    assert registry.snapshot().get(peer.name) is not None and doomed.name not in registry.expired()


@pytest.mark.skipif(not rabbitmq_up(), reason="no RabbitMQ on 127.0.0.1:5672")
def test_over_rabbitmq_the_registry_lives_in_the_result_backend(
    worker_factory: WorkerFactory, redis_server: LocalRedis
) -> None:
    backend = redis_server.url(62)
    worker = worker_factory(
        {**FAST, "GPUFLEET_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//", "GPUFLEET_RESULT_BACKEND": backend}
    )
    registry = FleetRegistry(backend, cache_s=0)
    assert registry_url(worker.settings) == backend
    # Its direct queue: other tests' RabbitMQ workers consume the shared "cpu" queue on the same vhost.
    job = worker.client.embed(EMBED, ["over amqp"], queue=worker.direct_queue)
    assert job.get(timeout=120)["worker"] == worker.name
    record = record_where(registry, worker.name, lambda r: r.ready and r.holds(EMBED) == "resident")
    assert record.backlog == 0 and record.type_queue == "cpu"
    stop_process(worker.process)
    assert registry.snapshot().get(worker.name) is None
