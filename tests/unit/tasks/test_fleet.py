"""The fleet registry against a real redis-server: publish, read through the cache, expire, claim, remove."""

from __future__ import annotations

import pytest

from gpufleet.tasks.errors import BrokerAuthenticationError, BrokerUnavailableError
from gpufleet.tasks.fleet import (
    ClaimedWorker,
    FleetRegistry,
    FleetSnapshot,
    HeldModel,
    WorkerRecord,
    describe,
    registry_url,
)
from gpufleet.tasks.settings import load_settings
from gpufleet.workers.tools.local_redis import LocalRedis, free_port
from tests.support.clock import FakeClock


def record(name: str, at: float, **fields: object) -> WorkerRecord:
    base: dict[str, object] = {
        "name": name,
        "host": "box",
        "pid": 1,
        "gpu_type": "cpu",
        "device": "cpu",
        "type_queue": "cpu",
        "direct_queue": f"cpu.{name}",
        "ready": True,
        "heartbeat_at": at,
        "ttl_s": 10.0,
    }
    return WorkerRecord.model_validate({**base, **fields})


def test_publish_read_expire_claim_remove(redis_server: LocalRedis) -> None:
    clock = FakeClock()
    registry = FleetRegistry(redis_server.url(14), cache_s=0.5, clock=clock)
    registry._client.flushdb()
    held = (HeldModel(model="org/a", bytes=10),)
    registry.publish(record("w1", clock.now, resident=held))
    registry.publish(record("w2", clock.now - 5, ready=False))
    snapshot = registry.snapshot()
    assert [w.name for w in snapshot.live()] == ["w1", "w2"]  # ready first
    assert [w.name for w in snapshot.ready()] == ["w1"]
    assert snapshot.get("w1") is not None and snapshot.get("w1").holds("org/a") == "resident"  # type: ignore[union-attr]
    registry.remove("w1")
    assert registry.snapshot().get("w1") is not None, "read from the cache within cache_s"
    clock.now += 1
    assert registry.snapshot().get("w1") is None
    clock.now += 5  # w2's heartbeat (5 s old at first) is now 11 s old: past its 10 s TTL
    assert registry.expired() == ["w2"]
    assert registry.snapshot(max_age_s=0).live() == ()
    claimed = registry.claim_expired("w2")
    assert claimed == ClaimedWorker(name="w2", type_queue="cpu", direct_queue="cpu.w2"), "its queues come with it"
    assert registry.claim_expired("w2") is None, "exactly one claimer"
    assert registry.expired() == []


def test_a_fresh_heartbeat_is_not_claimed(redis_server: LocalRedis) -> None:
    clock = FakeClock()
    registry = FleetRegistry(redis_server.url(14), clock=clock)
    registry._client.flushdb()
    registry.publish(record("w3", clock.now))
    assert registry.claim_expired("w3") is None
    clock.now += 10.5  # expired, but producers may still route to it from a cached snapshot: not yet
    assert registry.expired(grace_s=1.0) == [] and registry.claim_expired("w3", grace_s=1.0) is None
    clock.now += 1
    assert registry.expired(grace_s=1.0) == ["w3"]
    assert registry.claim_expired("w3", grace_s=1.0) is not None


def test_departed_workers_are_kept_for_their_queues_until_they_return(redis_server: LocalRedis) -> None:
    clock = FakeClock()
    registry = FleetRegistry(redis_server.url(14), cache_s=0, clock=clock)
    registry._client.flushdb()
    registry.publish(record("gone", clock.now))
    registry.publish(record("dead", clock.now))
    registry.remove("gone")
    assert [w.direct_queue for w in registry.departed(retention_s=60)] == ["cpu.gone"]
    clock.now += 11
    assert registry.claim_expired("dead") is not None
    assert sorted(w.name for w in registry.departed(retention_s=60)) == ["dead", "gone"]
    registry.publish(record("gone", clock.now))  # back under the same name: no longer departed
    assert [w.name for w in registry.departed(retention_s=60)] == ["dead"]
    clock.now += 61
    assert registry.departed(retention_s=60) == [], "forgotten after the retention"
    assert registry._client.hkeys("gpufleet:fleet:queues") == [b"gone"]


def test_describe_one_line() -> None:
    job = {"id": "0123456789", "task": "fleet.embed", "model": "org/a", "started_at": 98.0}
    held = (HeldModel(model="org/a", bytes=3 * 2**20, pinned=True),)
    worker = record("w", 100.0, gpu_count=2, resident=held, running_job=job, backlog=4, memory_total_bytes=2**30)
    line = describe(worker, now=100.5)
    assert line == (
        "w  cpux2  ready  mem 0 B / 0 B / 1.0 GiB  resident: org/a (3.0 MiB, pinned)  "
        "job: fleet.embed 01234567 (org/a, 2.5 s)  backlog 4"
    )
    assert "resident: none  job: idle" in describe(record("idle", 0.0, ready=False), now=0.0)


def test_registry_lives_in_redis_and_fails_fast_when_down() -> None:
    assert registry_url(load_settings(broker_url="amqp://guest@127.0.0.1//")) == "redis://127.0.0.1:6379/1"
    assert registry_url(load_settings(broker_url="amqp://x//", result_backend="rpc://")) is None
    registry = FleetRegistry(f"redis://:secret@127.0.0.1:{free_port()}/0", connect_timeout_s=0.5)
    with pytest.raises(BrokerUnavailableError, match=r"did not answer.*GPUFLEET_BROKER_URL") as raised:
        registry.snapshot()
    assert "secret" not in str(raised.value)


def test_a_wrong_password_is_an_authentication_error(redis_server: LocalRedis) -> None:
    registry = FleetRegistry(f"redis://:wrong@127.0.0.1:{redis_server.port}/0")
    with pytest.raises(BrokerAuthenticationError, match=r"authentication .* failed.*check the password") as raised:
        registry.snapshot()
    assert ":wrong@" not in str(raised.value)


def test_snapshot_is_a_value() -> None:
    snapshot = FleetSnapshot(workers=(record("old", 0.0), record("new", 100.0)), read_at=105.0)
    assert [w.name for w in snapshot.live()] == ["new"]
