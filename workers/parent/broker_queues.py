"""The Redis broker's queue lists as kombu lays them out: how many jobs wait on a queue, and moving one to another.

Used by the heartbeat (:mod:`gpufleet.workers.parent.heartbeat`) to report a worker's backlog and to move a departed
worker's direct queue back to its type queue. Only Redis brokers have lists; RabbitMQ needs none of this.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis

    from gpufleet.tasks.settings import Settings

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


@dataclass(frozen=True)
class KombuRedisLayout:
    """How kombu's Redis transport stores a queue: a list named after it, plus one list per priority step.

    Priority 0 is the queue's own key; step ``n`` is ``<queue><sep><n>`` (kombu.transport.redis
    ``Channel._q_for_pri``), every key under the transport's ``global_keyprefix``.
    """

    sep: str = "\x06\x16"
    priority_steps: tuple[int, ...] = (0, 3, 6, 9)
    prefix: str = ""

    @classmethod
    def from_transport_options(cls, options: Mapping[str, Any] | None) -> KombuRedisLayout:
        """The layout for these ``broker_transport_options`` (kombu's defaults for what they do not set)."""
        from kombu.transport.redis import PRIORITY_STEPS, Channel

        options = options or {}
        return cls(
            sep=str(options.get("sep", Channel.sep)),
            priority_steps=tuple(int(step) for step in options.get("priority_steps", PRIORITY_STEPS)),
            prefix=str(options.get("global_keyprefix", "")),
        )

    def keys(self, queue: str) -> list[str]:
        """The list keys holding ``queue``'s messages, highest priority (consumed first) first."""
        return [self.prefix + (f"{queue}{self.sep}{step}" if step else queue) for step in self.priority_steps]


class BrokerQueues:
    """The Redis broker's queue lists: how many jobs wait on one, and moving one onto another.

    Args:
        client: a Redis client on the broker's database.
        layout: how kombu names the lists.
    """

    def __init__(self, client: redis.Redis, layout: KombuRedisLayout | None = None) -> None:
        self._client = client
        self.layout = layout or KombuRedisLayout()

    @classmethod
    def from_settings(cls, settings: Settings, transport_options: Mapping[str, Any] | None) -> BrokerQueues | None:
        """The broker's queues, or None when the broker is not Redis (RabbitMQ has no lists to move)."""
        if not settings.broker_url.startswith(REDIS_SCHEMES):
            return None
        import redis

        timeout_s = settings.broker.connect_timeout_s
        client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        return cls(client, KombuRedisLayout.from_transport_options(transport_options))

    def backlog(self, queue: str) -> int:
        """Jobs waiting on ``queue`` (all priorities), not counting those a worker already reserved."""
        pipe = self._client.pipeline()
        for key in self.layout.keys(queue):
            pipe.llen(key)
        return sum(int(size) for size in pipe.execute())

    def drain(self, source: str, target: str) -> int:
        """Move every job waiting on ``source`` to ``target``, keeping their order and priorities.

        One message at a time, each move atomic (RPOPLPUSH): a crash between two moves loses nothing, and
        concurrent consumers of ``target`` see a valid queue throughout. The oldest job (the list's right end,
        which kombu pops first) moves first and lands behind what ``target`` already holds.

        Returns:
            How many jobs were moved.
        """
        moved = 0
        for source_key, target_key in zip(self.layout.keys(source), self.layout.keys(target), strict=True):
            # Nothing routes to a worker that left, so the source only shrinks and this loop ends.
            while self._client.rpoplpush(source_key, target_key) is not None:
                moved += 1
        return moved
