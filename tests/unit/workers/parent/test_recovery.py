"""Held deliveries recorded by the broker channel, claimed and restored by a peer, and the fences around that: on a
real redis-server through real kombu connections (no workers; those are tests/integration/test_recovery.py)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from kombu import Connection

from gpufleet.tasks.fleet import HELD_KEY_PREFIX, HOLDERS_KEY, fence_key
from gpufleet.tasks.settings import load_settings
from gpufleet.workers.common.identity import cpu_identity
from gpufleet.workers.common.snapshot import WorkerSnapshot
from gpufleet.workers.parent import held_transport
from gpufleet.workers.parent.heartbeat import Heartbeat
from gpufleet.workers.parent.held_transport import TTL_OPTION, WORKER_OPTION, HeldQoS, Transport, install
from gpufleet.workers.parent.recovery import Recovery
from gpufleet.workers.tools.local_redis import LocalRedis
from tests.support.clock import FakeClock

DB = 70  # broker database of these tests
TTL_S = 10.0


_connections: list[Connection] = []


@pytest.fixture
def broker(redis_server: LocalRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url(DB))
    client.flushdb()
    yield client
    while _connections:  # while Redis is up: kombu gives back what a connection still holds when it closes
        _connections.pop().release()
    client.flushdb()


def connection(redis_server: LocalRedis, **options: Any) -> Connection:
    conn = Connection(redis_server.url(DB), **options)
    _connections.append(conn)
    return conn


def worker_connection(redis_server: LocalRedis, worker: str) -> Connection:
    options = {WORKER_OPTION: worker, TTL_OPTION: TTL_S}
    return connection(redis_server, transport=Transport, transport_options=options)


def plain_channel(redis_server: LocalRedis) -> Callable[[], Any]:
    """What a claimer restores with: kombu's own Redis transport."""
    return lambda: connection(redis_server).default_channel


def take(conn: Connection, queue: str, job_id: str) -> Any:
    """Publish one job to ``queue`` and receive it on ``conn`` without acknowledging it."""
    simple = conn.SimpleQueue(queue)
    simple.put({"job": job_id}, headers={"id": job_id})
    return simple.get(timeout=5)


def recovery_for(
    redis_server: LocalRedis,
    broker: redis.Redis,
    clock: FakeClock,
    *,
    final: frozenset[str] = frozenset(),
    ours: tuple[str, ...] = (),
) -> Recovery:
    return Recovery(
        broker,
        plain_channel(redis_server),
        lambda job_id: job_id in final,
        ttl_s=TTL_S,
        live_keys=lambda: list(ours),
        clock=clock,
    )


def held_keys(broker: redis.Redis) -> list[str]:
    return [key.decode() for key in broker.zrange(HOLDERS_KEY, 0, -1)]


def test_a_delivery_is_held_in_the_same_transaction_as_unacked_and_released_on_ack(
    redis_server: LocalRedis, broker: redis.Redis
) -> None:
    conn = worker_connection(redis_server, "w1@unit")
    message = take(conn, "q-held", "job-1")
    [key] = held_keys(broker)
    assert key.startswith(HELD_KEY_PREFIX + "w1@unit:")
    assert broker.smembers(key) == {message.delivery_tag.encode()}
    assert broker.hexists("unacked", message.delivery_tag)
    assert held_transport.live_held_keys() == [key]
    message.ack()
    assert broker.smembers(key) == set() and not broker.hexists("unacked", message.delivery_tag)
    conn.release()  # a closed channel holds nothing any more
    assert key not in held_transport.live_held_keys()


def test_a_peer_claims_a_dead_holder_once_and_restores_its_jobs_marked_redelivered(
    redis_server: LocalRedis, broker: redis.Redis
) -> None:
    dead = worker_connection(redis_server, "dead@unit")
    running = take(dead, "q-dead", "job-running")
    finished = take(dead, "q-dead", "job-finished")
    [key] = held_keys(broker)  # the process "dies" here: nothing is acknowledged or restored
    clock = FakeClock(float(broker.zscore(HOLDERS_KEY, key) or 0) - 1)
    first = recovery_for(redis_server, broker, clock, final=frozenset({"job-finished"}))
    second = recovery_for(redis_server, broker, clock)

    assert first.expired(grace_s=1.5) == [], "not before its TTL and the grace ran out"
    clock.now += 3
    assert first.claim(key, grace_s=1.5) and not second.claim(key, grace_s=1.5), "exactly one claimer"
    assert broker.exists(fence_key(key))
    restored = first.restore(key)
    assert (restored.requeued, restored.finished, restored.gone) == (1, 1, 0)
    assert not broker.exists(key) and broker.zscore(HOLDERS_KEY, key) is None
    assert not broker.hexists("unacked", running.delivery_tag) and not broker.hexists("unacked", finished.delivery_tag)

    [raw] = broker.lrange("q-dead", 0, -1)
    payload = json.loads(raw)
    assert payload["headers"]["id"] == "job-running", "only the unfinished job is back"
    assert payload["headers"]["redelivered"] is True
    peer = worker_connection(redis_server, "peer@unit")
    again = peer.SimpleQueue("q-dead").get(timeout=5)
    assert again.headers["id"] == "job-running" and again.delivery_info["redelivered"]
    again.ack()
    assert first.restore(key).requeued == 0, "restoring twice puts nothing back twice"


def test_a_thawed_holder_neither_acknowledges_nor_gives_back_what_a_peer_restored(
    redis_server: LocalRedis, broker: redis.Redis
) -> None:
    frozen = worker_connection(redis_server, "frozen@unit")
    stale = take(frozen, "q-fence", "job-3")
    [key] = held_keys(broker)
    clock = FakeClock(float(broker.zscore(HOLDERS_KEY, key) or 0) + 5)
    claimer = recovery_for(redis_server, broker, clock)
    assert claimer.claim(key, grace_s=1.5) and not broker.exists(key), "the claim takes the tags from their owner"
    assert claimer.restore(key).requeued == 1
    peer = worker_connection(redis_server, "peer2@unit")
    fresh = peer.SimpleQueue("q-fence").get(timeout=5)
    assert fresh.delivery_tag == stale.delivery_tag, "kombu keeps the tag across a restore"

    stale.ack()  # the frozen worker thaws and acknowledges its stale copy
    assert broker.hexists("unacked", fresh.delivery_tag), "the new holder's entry survives"
    frozen.default_channel.qos.restore_unacked()  # or gives it back when it closes
    assert broker.llen("q-fence") == 0, "no second copy"
    fresh.ack()
    assert not broker.hexists("unacked", fresh.delivery_tag)


def test_the_visibility_timeout_stays_the_last_resort_for_anyones_tags(
    redis_server: LocalRedis, broker: redis.Redis
) -> None:
    holder = worker_connection(redis_server, "holder@unit")
    held = take(holder, "q-visibility", "job-4")
    options = {WORKER_OPTION: "scanner@unit", TTL_OPTION: TTL_S, "visibility_timeout": 0}
    scanner = connection(redis_server, transport=Transport, transport_options=options)
    scanner.default_channel.qos.restore_visible(num=10, interval=1)  # kombu's periodic scan, on another worker
    assert broker.llen("q-visibility") == 1 and not broker.hexists("unacked", held.delivery_tag)


def test_after_a_lost_connection_a_late_ack_is_left_to_the_claim(redis_server: LocalRedis, broker: redis.Redis) -> None:
    conn = worker_connection(redis_server, "lost@unit")
    message = take(conn, "q-lost", "job-5")
    qos = conn.default_channel.qos
    qos.abandoned = True  # what closing the channel after a lost connection marks first
    assert held_transport.live_held_keys() == []
    message.ack()  # the job finished while Redis was away: its result may not be stored
    [key] = held_keys(broker)
    assert broker.sismember(key, message.delivery_tag) and broker.hexists("unacked", message.delivery_tag)
    clock = FakeClock(float(broker.zscore(HOLDERS_KEY, key) or 0) + 5)
    assert recovery_for(redis_server, broker, clock).sweep(grace_s=1.5).requeued == 1, "no result: it runs again"


def test_sweep_skips_our_own_holders_and_tags_already_acknowledged(
    redis_server: LocalRedis, broker: redis.Redis
) -> None:
    conn = worker_connection(redis_server, "w2@unit")
    message = take(conn, "q-sweep", "job-2")
    [key] = held_keys(broker)
    clock = FakeClock(float(broker.zscore(HOLDERS_KEY, key) or 0) + 60)
    assert recovery_for(redis_server, broker, clock, ours=(key,)).sweep(grace_s=1.5).requeued == 0
    assert broker.zscore(HOLDERS_KEY, key) is not None, "a worker never claims its own open channel"
    broker.sadd(key, "a-tag-nobody-holds")
    message.ack()
    restored = recovery_for(redis_server, broker, clock).sweep(grace_s=1.5)
    assert (restored.requeued, restored.gone) == (0, 1)
    assert broker.llen("q-sweep") == 0


def test_the_owner_sees_the_fence_and_a_refresh_keeps_its_holders_alive(
    redis_server: LocalRedis, broker: redis.Redis
) -> None:
    clock = FakeClock()
    key = HELD_KEY_PREFIX + "w3@unit:abc"
    owner = recovery_for(redis_server, broker, clock, ours=(key,))
    assert owner.refresh() == 1 and broker.zscore(HOLDERS_KEY, key) == clock.now + TTL_S
    assert owner.fenced() == []
    clock.now += TTL_S + 5
    assert recovery_for(redis_server, broker, clock).claim(key, grace_s=1.5)
    assert owner.fenced() == [key]


def test_install_only_on_a_redis_broker_with_recovery_on(redis_server: LocalRedis) -> None:
    from gpufleet.tasks.app import create_app

    on = load_settings(broker_url=redis_server.url(DB))
    app = create_app(on)
    assert install(app, "w@unit", on)
    assert app.conf.broker_transport == held_transport.TRANSPORT_PATH
    assert app.conf.broker_transport_options[WORKER_OPTION] == "w@unit"
    with app.connection_for_read() as conn:
        assert isinstance(conn.default_channel.qos, HeldQoS)
    off = load_settings(broker_url=redis_server.url(DB), fleet={"recover_held_jobs": False})
    assert not install(create_app(off), "w@unit", off)
    amqp = load_settings(broker_url="amqp://guest:guest@127.0.0.1:5672//")
    assert not install(create_app(amqp), "w@unit", amqp)


class FakeRegistry:
    def __init__(self) -> None:
        self.published = 0
        self.up = True

    def publish(self, record: Any) -> None:
        if not self.up:
            raise ConnectionError("registry down")
        self.published += 1

    def expired(self, *, grace_s: float) -> list[str]:
        return []


class FakeRecovery:
    def __init__(self, fenced: list[str]) -> None:
        self._fenced = fenced
        self.sweeps = 0

    def fenced(self) -> list[str]:
        return self._fenced

    def refresh(self) -> int:
        return 0

    def sweep(self, *, grace_s: float) -> Any:
        from gpufleet.workers.parent.recovery import Restored

        self.sweeps += 1
        return Restored()


def heartbeat(clock: FakeClock, registry: FakeRegistry, recovery: FakeRecovery, fenced: list[list[str]]) -> Heartbeat:
    settings = load_settings(fleet={"heartbeat_ttl_s": TTL_S, "heartbeat_interval_s": 2.0})
    return Heartbeat(
        cpu_identity(name="hb@unit"),
        settings,
        registry,  # type: ignore[arg-type]
        None,
        lambda: WorkerSnapshot(worker="hb@unit"),
        clock=clock,
        recovery=recovery,  # type: ignore[arg-type]
        on_fenced=fenced.append,
    )


def test_a_claimer_must_have_beaten_for_a_whole_ttl_and_a_thawed_fenced_worker_stops() -> None:
    clock, registry, fenced = FakeClock(), FakeRegistry(), []
    recovery = FakeRecovery(["held:x"])
    beat = heartbeat(clock, registry, recovery, fenced)
    beat.beat()
    assert not beat.trusted and recovery.sweeps == 0, "a fresh worker does not take peers for dead yet"
    for _ in range(5):
        clock.now += 2
        beat.beat()
    assert beat.trusted and recovery.sweeps == 1

    registry.up = False  # a Redis outage: beats fail, trust is gone until a TTL of good beats
    clock.now += 2
    assert not beat.tick() and not beat.trusted
    registry.up = True
    clock.now += 2
    beat.beat()
    assert not beat.trusted

    clock.now += TTL_S + 20  # frozen (SIGSTOP) past its TTL; a peer claimed it meanwhile
    published = registry.published
    beat.beat()
    assert fenced == [["held:x"]] and registry.published == published, "it stops instead of beating on"
