"""kombu's Redis transport, plus a record of which deliveries each worker channel holds.

kombu emulates acknowledgements on Redis: a delivered message goes into the ``unacked`` hash (and the
``unacked_index`` sorted set, scored by delivery time) and only comes back to its queue once it is older than the
visibility timeout (an hour here, since it must exceed the longest hard time limit). Nothing in Redis says which
consumer holds which message, so nobody can give a dead worker's jobs back sooner.

This transport adds that fact, in the same MULTI/EXEC as kombu's own bookkeeping, so it is exact and costs no
extra round trip:

- on delivery, the tag goes into the channel's held set (:func:`gpufleet.tasks.fleet.held_key`, one per channel) and the
  set's holder entry in ``gpufleet:fleet:holders`` is scored "alive until now + TTL";
- on ack, reject or restore (kombu's ``_remove_from_indices``), the tag leaves the held set.

It also fences a holder a peer already claimed. kombu keeps a message's delivery tag when it restores it, so a
restored job delivered to another worker sits in ``unacked`` under the same tag. A worker that was only frozen
and acknowledges (or gives back) a tag afterwards would otherwise delete the new holder's entry (the job is then
lost if that holder dies) or push a second copy. Here an ack or reject removes the tag only while it is still in
this channel's held set (one Lua script), and the channel gives back (reject with requeue, close) only such tags
(a WATCH transaction on both keys). kombu's ``restore_by_tag`` itself stays as it is: its visibility-timeout scan,
the last resort, restores whoever's tags are too old.

The worker's heartbeat keeps the holder entries of its open channels fresh; when one expires (the worker died, or
a lost connection closed the channel), a live worker restores exactly those tags with kombu's own restore code
(:mod:`gpufleet.workers.parent.recovery`). Installed on a worker's app by :func:`install` when the broker is Redis;
producers and RabbitMQ workers use kombu's transports unchanged.
"""

from __future__ import annotations

import time
import uuid
import weakref
from typing import TYPE_CHECKING, Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from gpufleet.tasks.fleet import HOLDERS_KEY, held_key

if TYPE_CHECKING:
    from celery import Celery

    from gpufleet.tasks.settings import Settings

TRANSPORT_PATH = "gpufleet.workers.parent.held_transport:Transport"
WORKER_OPTION = "gpufleet_worker"
TTL_OPTION = "gpufleet_holder_ttl_s"
# Broker URLs kombu serves with its plain Redis transport (sentinel:// has a channel of its own: left alone).
SCHEMES = ("redis://", "rediss://")

# Remove a delivery from kombu's unacked hash and index only while this channel still holds it.
_REMOVE_IF_HELD = (
    "if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1 then "
    "redis.call('ZREM', KEYS[1], ARGV[1]) redis.call('HDEL', KEYS[2], ARGV[1]) redis.call('SREM', KEYS[3], ARGV[1]) "
    "return 1 end return 0"
)

# Every held-set QoS of this process; the heartbeat refreshes the holder entries of those still open.
_qos_instances: weakref.WeakSet[HeldQoS] = weakref.WeakSet()


class HeldQoS(kombu_redis.QoS):
    """kombu's Redis QoS that also keeps the channel's held set (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]  # kombu's QoS is untyped
        worker = getattr(self.channel, WORKER_OPTION, None)
        self.held_key: str | None = held_key(worker, uuid.uuid4().hex[:12]) if worker else None
        self.holder_ttl_s = float(getattr(self.channel, TTL_OPTION, 10.0))
        self.used = False  # a channel that never held a delivery has no holder entry to keep fresh
        self.abandoned = False  # its channel is being closed: what it holds can no longer be acknowledged here
        _qos_instances.add(self)

    def append(self, message: Any, delivery_tag: str) -> None:
        """kombu's ``append`` (unacked hash and index) with the held set and holder entry in the same MULTI."""
        if self.held_key is None:
            super().append(message, delivery_tag)  # type: ignore[no-untyped-call]
            return
        delivery = message.delivery_info
        entry = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])  # type: ignore[no-untyped-call]
        now = time.time()
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: now}).hset(self.unacked_key, delivery_tag, entry).sadd(
                self.held_key, delivery_tag
            ).zadd(HOLDERS_KEY, {self.held_key: now + self.holder_ttl_s}).execute()
        self.used = True
        virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]  # kombu's in-memory bookkeeping, as its own append does

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None) -> Any:
        # kombu's own removal (its restore code, the visibility-timeout restore of anyone's tag) plus the held set.
        pipe = super()._remove_from_indices(delivery_tag, pipe)  # type: ignore[no-untyped-call]
        return pipe if self.held_key is None else pipe.srem(self.held_key, delivery_tag)

    def _remove_if_held(self, delivery_tag: str, pipe: Any = None) -> Any:
        if self.held_key is None:
            return self._remove_from_indices(delivery_tag, pipe)
        # EVAL is not among the commands kombu's client prefixes: the keys carry global_keyprefix explicitly.
        keys = [self._prefixed(key) for key in (self.unacked_index_key, self.unacked_key, self.held_key)]
        with self.pipe_or_acquire(pipe) as acquired:
            return acquired.eval(_REMOVE_IF_HELD, 3, *keys, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        """kombu's ``ack``, a no-op on the unacked hash for a tag a peer claimed from this channel.

        Nothing at all once the channel was abandoned (a lost connection): a job that was still running then may
        finish while its result cannot be stored (the broker's Redis is the result backend's, and it is down), and
        acknowledging it would lose it. Its tag stays held; the claim of this channel's holder drops it if its
        result was stored and puts it back on its queue otherwise.
        """
        if not self.abandoned:
            self._remove_if_held(delivery_tag).execute()
        virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        """kombu's ``reject``, for tags this channel still holds (see :meth:`ack`)."""
        if self.abandoned:
            pass  # left to the claim of this channel's holder, like an ack
        elif requeue:
            self.restore_if_held(delivery_tag, leftmost=True)
        else:
            self._remove_if_held(delivery_tag).execute()
        virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]

    def restore_unacked(self, client: Any = None) -> None:
        """kombu's give-back of everything this channel holds (at close), for tags it still holds."""
        with self.channel.conn_or_acquire(client) as acquired:
            for tag in self._delivered:
                self.restore_if_held(tag, client=acquired)
        self._delivered.clear()

    def restore_if_held(self, tag: str, client: Any = None, leftmost: bool = False) -> None:
        """kombu's ``restore_by_tag``, only while this channel still holds ``tag`` (see the module docstring).

        kombu's own ``restore_by_tag`` stays unconditional: its visibility-timeout scan restores anyone's tags.
        """
        if self.held_key is None:
            self.restore_by_tag(tag, client, leftmost)  # type: ignore[no-untyped-call]
            return
        held_key = self.held_key

        def restore_transaction(pipe: Any) -> None:
            entry = pipe.hget(self.unacked_key, tag)
            mine = pipe.execute_command("SISMEMBER", self._prefixed(held_key), tag)
            pipe.multi()
            if not mine:
                return  # a peer claimed this holder and restored the job: it is someone else's now
            self._remove_from_indices(tag, pipe)
            if entry:
                message, exchange, routing_key = loads(bytes_to_str(entry))  # type: ignore[no-untyped-call]
                self.channel._do_restore_message(message, exchange, routing_key, pipe, leftmost)

        with self.channel.conn_or_acquire(client) as acquired:
            acquired.transaction(restore_transaction, self.unacked_key, held_key)

    def _prefixed(self, key: str) -> str:
        return str(getattr(self.channel, "global_keyprefix", "") or "") + key

    @property
    def open(self) -> bool:
        """Whether this QoS's channel can still acknowledge what it holds."""
        return not self.abandoned and not self.channel.closed


class HeldChannel(kombu_redis.Channel):
    """kombu's Redis channel with :class:`HeldQoS` and two transport options (worker name, holder TTL)."""

    QoS = HeldQoS
    gpufleet_worker: str | None = None
    gpufleet_holder_ttl_s: float = 10.0
    from_transport_options = (*kombu_redis.Channel.from_transport_options, WORKER_OPTION, TTL_OPTION)  # type: ignore[assignment]

    def close(self) -> None:
        # Marked first: after a lost connection kombu's close raises before it flags the channel closed, and Celery
        # drops it all the same (its reserved jobs are forgotten), so its holder entry must stop being refreshed.
        if self._qos is not None:
            self._qos.abandoned = True
        super().close()  # type: ignore[no-untyped-call]


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`HeldChannel`."""

    Channel = HeldChannel


def live_held_keys() -> list[str]:
    """The held-set keys of this process's open channels that have held a delivery (unprefixed)."""
    return sorted(qos.held_key for qos in list(_qos_instances) if qos.held_key and qos.used and qos.open)


def install(app: Celery, worker: str, settings: Settings) -> bool:
    """Make ``app`` (a worker's, before it connects) use this transport when its broker is Redis.

    Args:
        app: the worker's Celery app.
        worker: the worker's name (its held sets are named after it).
        settings: ``fleet.recover_held_jobs`` (off: kombu's transport, unchanged) and ``fleet.heartbeat_ttl_s``.

    Returns:
        Whether the transport was installed.
    """
    if not settings.fleet.recover_held_jobs or not settings.broker_url.startswith(SCHEMES):
        return False
    app.conf.broker_transport = TRANSPORT_PATH
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        WORKER_OPTION: worker,
        TTL_OPTION: settings.fleet.heartbeat_ttl_s,
    }
    return True
