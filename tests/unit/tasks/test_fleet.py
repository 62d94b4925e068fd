"""The fleet registry against a real redis-server: publish, read through the cache, expire, claim, remove."""

from __future__ import annotations

import pytest

from tasks.errors import BrokerUnavailableError
from tasks.fleet import FleetRegistry, FleetSnapshot, HeldModel, WorkerRecord, registry_url
from tasks.settings import load_settings
from workers.local_redis import LocalRedis, free_port


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


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
    clock = Clock()
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
    assert registry.claim_expired("w2") is True
    assert registry.claim_expired("w2") is False, "exactly one claimer"
    assert registry.expired() == []


def test_a_fresh_heartbeat_is_not_claimed(redis_server: LocalRedis) -> None:
    clock = Clock()
    registry = FleetRegistry(redis_server.url(14), clock=clock)
    registry._client.flushdb()
    registry.publish(record("w3", clock.now))
    assert registry.claim_expired("w3") is False


def test_registry_lives_in_redis_and_fails_fast_when_down() -> None:
    assert registry_url(load_settings(broker_url="amqp://guest@127.0.0.1//")) == "redis://127.0.0.1:6379/1"
    assert registry_url(load_settings(broker_url="amqp://x//", result_backend="rpc://")) is None
    registry = FleetRegistry(f"redis://:secret@127.0.0.1:{free_port()}/0", connect_timeout_s=0.5)
    with pytest.raises(BrokerUnavailableError, match=r"did not answer.*GPUFLEET_BROKER_URL") as raised:
        registry.snapshot()
    assert "secret" not in str(raised.value)


def test_snapshot_is_a_value() -> None:
    snapshot = FleetSnapshot(workers=(record("old", 0.0), record("new", 100.0)), read_at=105.0)
    assert [w.name for w in snapshot.live()] == ["new"]
