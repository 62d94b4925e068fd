"""The heartbeat: records built from a real runtime's snapshot, queues moved on a real redis-server, and
`gpufleet status` reading what heartbeats publish."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from gpufleet.tasks.fleet import FleetRegistry, WorkerRecord
from gpufleet.tasks.settings import Settings, load_settings
from gpufleet.workers.child import state
from gpufleet.workers.child.runtime import LOAD_S_BUCKETS, WorkerRuntime
from gpufleet.workers.cli import main
from gpufleet.workers.common.identity import WorkerIdentity, cpu_identity
from gpufleet.workers.common.snapshot import WorkerSnapshot, read_snapshot
from gpufleet.workers.parent.broker_queues import BrokerQueues, KombuRedisLayout
from gpufleet.workers.parent.heartbeat import Heartbeat, build_record, package_versions
from gpufleet.workers.tools.local_redis import LocalRedis, free_port
from tests.support.clock import FakeClock
from tests.support.runtimes import cpu_runtime

MiB = 2**20
DB = 52


def model_bytes(root: Path, name: str) -> int:
    return (root / "org" / name / "model.safetensors").stat().st_size


def as_written(snapshot: WorkerSnapshot) -> WorkerSnapshot:
    """The snapshot as the parent reads it back from the child's file."""
    return WorkerSnapshot.model_validate_json(snapshot.model_dump_json())


@pytest.fixture(scope="module")
def busy_runtime(tiny_model_root: Path, tmp_path_factory: pytest.TempPathFactory) -> WorkerRuntime:
    """A started CPU runtime holding org/b (pinned) and org/c, with org/a evicted to the parked tier."""
    sizes = sorted(model_bytes(tiny_model_root, n) for n in "abc")
    runtime = cpu_runtime(
        tmp_path_factory.mktemp("state"),
        model_root=tiny_model_root,
        gpu={"memory_pool": {"budget_bytes": sizes[1] + sizes[2] + sizes[0] // 2, "host_budget_bytes": 64 * MiB}},
    )
    runtime.acquire("org/a")
    runtime.acquire("org/b", pinned=True)
    runtime.acquire("org/c")  # evicts org/a, the least recently used unpinned model, into the parked tier
    return runtime


def test_record_from_a_real_snapshot(busy_runtime: WorkerRuntime) -> None:
    identity = busy_runtime.identity
    busy_runtime.begin_job("job-1", "fleet.embed", "org/c")
    running = build_record(identity, as_written(state.snapshot(busy_runtime)), ttl_s=10.0, now=1000.0, backlog=3)
    assert running.name == "cpu-0@unit" and running.gpu_type == "cpu" and running.device == "cpu"
    assert (running.type_queue, running.direct_queue) == ("cpu", "cpu.cpu-0@unit")
    assert running.ready and running.warm and running.backlog == 3 and running.expires_at == 1010.0
    assert running.running_job is not None and running.running_job.model == "org/c"
    assert running.running_job.id == "job-1" and running.running_job.task == "fleet.embed"
    assert {(m.model, m.pinned) for m in running.resident} == {("org/b", True), ("org/c", False)}
    assert [m.model for m in running.parked] == ["org/a"] and running.parked[0].bytes > 0
    assert busy_runtime.cache is not None and busy_runtime.pool is not None
    assert running.memory_used_bytes == busy_runtime.cache.used_bytes > 0
    assert running.memory_budget_bytes == busy_runtime.pool.budget_bytes
    assert running.memory_total_bytes == identity.memory_bytes
    assert running.holds("org/a") == "parked" and running.holds("org/b") == "resident"
    assert (running.cache_misses, running.cache_evictions) == (3, 1)
    # Three disk loads: every one in the +Inf bucket, the buckets cumulative, the sum their total time.
    assert running.load_s_buckets["+Inf"] == 3 and running.load_s_sum > 0
    counts = [running.load_s_buckets[str(bound)] for bound in LOAD_S_BUCKETS]
    assert counts == sorted(counts) and counts[-1] <= 3

    busy_runtime.end_job("fleet.embed", "ok")
    busy_runtime.begin_job("job-2", "fleet.embed", "org/x")
    busy_runtime.end_job("fleet.embed", "ModelNotFoundError")
    busy_runtime.acquire("org/c")
    done = build_record(identity, as_written(state.snapshot(busy_runtime)), ttl_s=10.0, now=1001.0)
    assert done.running_job is None and done.cache_hits == 1
    assert done.jobs_by_outcome == {"fleet.embed|ok": 1, "fleet.embed|ModelNotFoundError": 1}


def test_a_previous_runs_snapshot_and_a_damaged_one_read_as_not_ready(
    busy_runtime: WorkerRuntime, tmp_path: Path
) -> None:
    snapshot = as_written(state.snapshot(busy_runtime))
    stale = build_record(busy_runtime.identity, snapshot, ttl_s=10.0, now=2000.0, since=snapshot.updated_at + 1)
    assert not stale.ready and stale.resident == () and stale.memory_used_bytes == 0
    damaged = {"ready": "yes", "models": [], "gpu": {"memory_pool": {"budget_bytes": "lots"}}, "running_job": {}}
    path = tmp_path / "damaged.json"
    path.write_text(json.dumps({"worker": "cpu-0@unit", **damaged}))
    record = build_record(busy_runtime.identity, read_snapshot(path, "cpu-0@unit"), ttl_s=10.0, now=0.0)
    assert not record.ready and record.memory_budget_bytes == 0 and record.running_job is None


def test_versions_come_from_metadata_only() -> None:
    versions = package_versions()
    assert {"gpufleet", "celery", "kombu"} <= versions.keys()
    assert "no-such-package-xyz" not in package_versions(("no-such-package-xyz",))


def test_multi_gpu_identity_is_carried() -> None:
    identity = WorkerIdentity("h100x2-0@box", "H100", "cuda:0", 0, "2x H100", 160 * 2**30, gpu_indices=(0, 1))
    record = build_record(identity, WorkerSnapshot(worker=identity.name), ttl_s=10.0, now=0.0)
    assert record.gpu_indices == (0, 1) and record.gpu_count == 2 and record.type_queue == "gpu.h100"
    assert record.memory_total_bytes == 160 * 2**30 and not record.ready


# -- moving queues on a real Redis -----------------------------------------------------------------------------


@pytest.fixture
def broker(redis_server: LocalRedis) -> redis.Redis:
    client = redis.Redis.from_url(redis_server.url(DB))
    client.flushdb()
    return client


def test_layout_matches_kombu() -> None:
    from kombu.transport.redis import Channel

    layout = KombuRedisLayout.from_transport_options({"global_keyprefix": "p:"})
    assert layout.keys("cpu") == ["p:cpu", f"p:cpu{Channel.sep}3", f"p:cpu{Channel.sep}6", f"p:cpu{Channel.sep}9"]


def test_drain_keeps_order_and_priorities(broker: redis.Redis) -> None:
    queues = BrokerQueues(broker)
    sep = queues.layout.sep
    for i in range(5):
        broker.lpush("cpu.dead@box", f"job-{i}")  # kombu publishes with LPUSH and consumes with RPOP
    broker.lpush(f"cpu.dead@box{sep}9", "urgent")
    broker.lpush("cpu", "already-there")
    assert queues.backlog("cpu.dead@box") == 6
    assert queues.drain("cpu.dead@box", "cpu") == 6
    assert queues.backlog("cpu.dead@box") == 0
    consumed = [broker.rpop("cpu") for _ in range(6)]
    assert [c.decode() for c in consumed if c] == ["already-there"] + [f"job-{i}" for i in range(5)]
    assert broker.lrange(f"cpu{sep}9", 0, -1) == [b"urgent"], "the priority sub-queue moves to its own kind"
    assert queues.drain("cpu.dead@box", "cpu") == 0


def heartbeat_for(
    name: str, url: str, settings: Settings, snapshot: dict[str, Any], clock: Callable[[], float] = time.time
) -> Heartbeat:
    registry = FleetRegistry(url, cache_s=0, clock=clock)
    queues = BrokerQueues(redis.Redis.from_url(url))
    written = WorkerSnapshot.model_validate({"worker": name, **snapshot})
    return Heartbeat(cpu_identity(name=name), settings, registry, queues, lambda: written, clock=clock)


def test_a_dead_workers_queue_is_moved_by_one_live_worker(broker: redis.Redis, redis_server: LocalRedis) -> None:
    url = redis_server.url(DB)
    settings = load_settings(broker_url=url, fleet={"heartbeat_interval_s": 1, "heartbeat_ttl_s": 2})
    clock = FakeClock(time.time())
    dead = heartbeat_for("dead@box", url, settings, {"ready": True}, clock)
    live = [heartbeat_for(f"live{i}@box", url, settings, {"ready": True}, clock) for i in range(2)]
    dead.beat()
    for heartbeat in live:
        heartbeat.beat()
    for i in range(3):
        broker.lpush("cpu.dead@box", f"job-{i}")
    assert [w.name for w in live[0].registry.snapshot().live()] == ["dead@box", "live0@box", "live1@box"]
    assert live[0].record().backlog == 0 and dead.record().backlog == 3

    # dead@box stops beating; its record expires with the TTL and, after the grace, one live worker claims it.
    clock.now += 2 + settings.fleet.registry_cache_s + 1
    for heartbeat in live:
        heartbeat.registry.publish(heartbeat.record())
    assert live[0].registry.expired() == ["dead@box"]
    moved = [heartbeat.sweep() for heartbeat in live]
    assert sorted(moved) == [0, 3]
    assert broker.llen("cpu.dead@box") == 0 and broker.llen("cpu") == 3
    # A job kombu gives back to the dead worker's queue later is moved too (the departed set).
    broker.rpush("cpu.dead@box", "given-back")
    assert live[1].sweep() == 1 and broker.llen("cpu") == 4


def test_graceful_stop_leaves_at_once_and_hands_the_queue_back(broker: redis.Redis, redis_server: LocalRedis) -> None:
    url = redis_server.url(DB)
    settings = load_settings(broker_url=url, fleet={"heartbeat_interval_s": 5, "heartbeat_ttl_s": 10})
    heartbeat = heartbeat_for("leaving@box", url, settings, {"ready": True})
    heartbeat.start()
    registry = FleetRegistry(url, cache_s=0)
    deadline = time.monotonic() + 10
    while registry.snapshot().get("leaving@box") is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the first beat is sent at once, from the heartbeat's thread
    assert registry.snapshot().get("leaving@box") is not None
    broker.lpush("cpu.leaving@box", "job")
    assert heartbeat.stop() == 1
    assert registry.snapshot().get("leaving@box") is None and registry.expired() == []
    assert broker.lrange("cpu", 0, -1) == [b"job"]
    # Back under the same name: it consumes its direct queue itself, so peers stop moving it.
    heartbeat_for("leaving@box", url, settings, {}).beat()
    assert registry.departed(retention_s=60) == []


def test_a_stopping_worker_is_draining_at_once_and_beats_on_until_it_stops(
    broker: redis.Redis, redis_server: LocalRedis
) -> None:
    url = redis_server.url(DB)
    # Beats far apart: "at once" must not wait for the next one.
    settings = load_settings(broker_url=url, fleet={"heartbeat_interval_s": 30, "heartbeat_ttl_s": 60})
    heartbeat = heartbeat_for("stopping@box", url, settings, {"ready": True})
    registry = FleetRegistry(url, cache_s=0)

    def record_where(check: Callable[[WorkerRecord], bool]) -> WorkerRecord:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            record = registry.snapshot().get("stopping@box")
            if record is not None and check(record):
                return record
            time.sleep(0.02)
        pytest.fail("the registry never showed the expected record of stopping@box")

    heartbeat.start()
    try:
        first = record_where(lambda r: r.ready and not r.draining)
        started = time.monotonic()
        heartbeat.drain()  # what worker_shutting_down calls, in Celery's signal handler
        draining = record_where(lambda r: r.draining)
        assert time.monotonic() - started < 2, "published at once, not at the next beat"
        assert draining.heartbeat_at > first.heartbeat_at, "a fresh beat: peers keep it alive"
        assert registry.snapshot().routable() == () and registry.snapshot().ready() == ()
    finally:
        heartbeat.stop()
    assert registry.snapshot().get("stopping@box") is None, "it leaves on worker_shutdown"


def test_a_failing_beat_is_logged_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    settings = load_settings(broker_url=url)
    registry = FleetRegistry(url, cache_s=0, connect_timeout_s=0.2)
    heartbeat = Heartbeat(cpu_identity(name="w@box"), settings, registry, None, lambda: WorkerSnapshot(worker="w@box"))
    assert heartbeat.tick() is False and heartbeat.tick() is False
    failures = [r for r in caplog.records if "heartbeat of w@box failed" in r.getMessage()]
    assert len(failures) == 1, "logged once until it recovers, not every tick"


# -- gpufleet status -------------------------------------------------------------------------------------------


def test_status_lists_live_workers(
    busy_runtime: WorkerRuntime, redis_server: LocalRedis, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    url = redis_server.url(DB + 1)
    registry = FleetRegistry(url, cache_s=0)
    registry._client.flushdb()
    monkeypatch.setenv("GPUFLEET_BROKER_URL", url)
    assert main(["status"]) == 1
    assert "no live workers" in capsys.readouterr().out
    busy_runtime.begin_job("abcdef123456", "fleet.generate", "org/b")
    record = build_record(busy_runtime.identity, as_written(state.snapshot(busy_runtime)), ttl_s=30, now=time.time())
    busy_runtime.end_job("fleet.generate", "ok")
    registry.publish(record)
    assert main(["status"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("cpu-0@unit  cpu  ready  mem ") and len(line.splitlines()) == 1
    assert "org/b (" in line and "pinned" in line and "parked: org/a" in line
    assert "job: fleet.generate abcdef12 (org/b, " in line and line.endswith("backlog 0")
    assert main(["status", "--json"]) == 0
    assert [w["name"] for w in json.loads(capsys.readouterr().out)] == ["cpu-0@unit"]


def test_status_without_a_redis_registry_says_so(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setenv("GPUFLEET_BROKER_URL", "amqp://guest@127.0.0.1//")
    monkeypatch.setenv("GPUFLEET_RESULT_BACKEND", "rpc://")
    assert main(["status"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--control" in err
