"""A dead worker's jobs back on their queues within seconds (Redis broker), exactly once.

Each worker channel records the deliveries it holds (:mod:`gpufleet.workers.parent.held_transport`) and the worker's
heartbeat keeps its channels' holder entries alive. When a holder entry expires (``heartbeat_ttl_s`` after the last sign
of life: the worker was killed, its machine lost, or a lost connection closed that channel), a live worker's
heartbeat:

1. **claims** it (a Lua script: only if still expired, rescored to a claim lease so exactly one claimer works on
   it, a fence key written for its owner, and the held set moved aside to ``<key>:claimed`` in the same step, so a
   frozen owner that thaws no longer holds those tags: its late acknowledgements are no-ops, see
   :mod:`gpufleet.workers.parent.held_transport`);
2. for each tag of the held set still in kombu's ``unacked`` hash, reads the job's id from the message and asks
   the result backend: a job that ran to an answer (SUCCESS or FAILURE) is only dropped from ``unacked`` (its
   worker died before the acknowledgement), any other is **restored with kombu's own code**
   (``QoS.restore_by_tag``: a WATCH transaction, the message marked ``redelivered``, back on its queue and
   priority), so a tag someone else acknowledged or restored meanwhile is left alone. REVOKED counts as
   unanswered: Celery stores it itself when it terminates a running job after a lost connection
   (``worker_cancel_long_running_tasks_on_connection_loss``) and expects a redelivery, while a revoke a caller
   sent is in every worker's revoked list and is honoured when the job is delivered again;
3. deletes the moved-aside set and the holder entry. A claimer that dies half-way leaves the entry to expire again
   at the end of its lease, and the next claimer finishes the work (restores are idempotent).

Fencing, so a worker that was only slow never has its jobs run twice:

- a busy worker keeps heartbeating from its parent while the pool child runs a long job, so it is never claimed;
- a claimer must have heartbeaten without a gap for a whole TTL itself, so after a Redis outage (every record
  expired) nobody claims a live peer before that peer has had time to heartbeat again;
- a worker that was stopped (SIGSTOP, a frozen VM) past its TTL checks on its next beat whether a peer claimed one
  of its holders; if so its jobs were handed on and it stops at once (:func:`stop_fenced_worker`: a hard exit,
  acknowledging and restoring nothing, since the tags it holds are now another worker's). A job its pool child
  was running when it froze may still finish after the thaw, before the beat notices: that one job then runs
  twice (once here, once on the peer), and the caller still gets one answer.

kombu's visibility timeout stays the last resort (a worker whose broker database was wiped, a holder never
claimed because no live worker was left).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpufleet.tasks.fleet import HELD_KEY_PREFIX, HOLDERS_KEY, fence_key
from gpufleet.workers.parent.held_transport import SCHEMES, live_held_keys

if TYPE_CHECKING:
    import redis
    from celery import Celery

    from gpufleet.tasks.settings import Settings

log = logging.getLogger(__name__)

# How long a claimer has to restore a holder's jobs before another claimer may take over (a crash half-way).
CLAIM_LEASE_S = 60.0
# How long a fence outlives the claim: longer than any freeze we could still wake up from and act on.
FENCE_TTL_S = 24 * 3600

_CLAIM_SCRIPT = (
    "local s = redis.call('ZSCORE', KEYS[1], ARGV[1]) "
    "if s and tonumber(s) <= tonumber(ARGV[2]) then "
    "redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1]) "
    "redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[5]) "
    "if redis.call('EXISTS', KEYS[3]) == 1 then "
    "redis.call('SUNIONSTORE', KEYS[4], KEYS[4], KEYS[3]) redis.call('DEL', KEYS[3]) end "
    "return 1 end "
    "return 0"
)
# Forget a restored held set; keep its holder entry if its owner thawed and took new deliveries meanwhile (they are
# claimed in turn when that entry expires).
_FINISH_SCRIPT = (
    "redis.call('DEL', KEYS[1]) "
    "if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('ZREM', KEYS[3], ARGV[1]) end "
    "return 1"
)


@dataclass
class Restored:
    """What restoring one or more held sets did, per delivery tag."""

    requeued: int = 0  # back on their queues, marked redelivered
    finished: int = 0  # already had a final result: dropped from unacked, not run again
    gone: int = 0  # no longer unacknowledged (acknowledged, or restored by someone else)

    def add(self, other: Restored) -> None:
        self.requeued += other.requeued
        self.finished += other.finished
        self.gone += other.gone


class Recovery:
    """Keeps this worker's holder entries alive, claims expired ones, restores their jobs (see the module docstring).

    Args:
        client: a Redis client on the broker's database.
        restore_channel: opens a kombu channel on the broker (kombu's own Redis transport), used for its restore
            code; called once, lazily, and again after a failure.
        is_final: whether a job id has a final state in the result backend.
        prefix: kombu's ``global_keyprefix`` (every broker key, the held sets included, carries it).
        ttl_s: how long a holder entry stays alive after a beat (``fleet.heartbeat_ttl_s``).
        live_keys: this process's open held sets (default:
        :func:`gpufleet.workers.parent.held_transport.live_held_keys`). clock: seconds since the epoch.
    """

    def __init__(
        self,
        client: redis.Redis,
        restore_channel: Callable[[], Any],
        is_final: Callable[[str], bool],
        *,
        prefix: str = "",
        ttl_s: float,
        live_keys: Callable[[], list[str]] = live_held_keys,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._open_channel = restore_channel
        self._channel: Any = None
        self._is_final = is_final
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._live_keys = live_keys
        self._clock = clock

    @classmethod
    def from_app(cls, app: Celery, settings: Settings) -> Recovery | None:
        """The recovery of a worker's app, or None when its broker is not Redis or recovery is off."""
        if not settings.fleet.recover_held_jobs or not settings.broker_url.startswith(SCHEMES):
            return None
        import redis
        from celery import states
        from kombu.transport.redis import Transport as KombuRedisTransport

        timeout_s = settings.broker.connect_timeout_s
        client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        prefix = str((app.conf.broker_transport_options or {}).get("global_keyprefix", ""))

        def restore_channel() -> Any:
            return app.connection_for_write(transport=KombuRedisTransport).default_channel

        def is_final(job_id: str) -> bool:
            return app.backend.get_task_meta(job_id).get("status") in (states.SUCCESS, states.FAILURE)

        return cls(client, restore_channel, is_final, prefix=prefix, ttl_s=settings.fleet.heartbeat_ttl_s)

    def _key(self, key: str) -> str:
        return self.prefix + key

    # -- this worker's side ---------------------------------------------------------------------------------------

    def refresh(self) -> int:
        """Mark this worker's open held sets alive for another TTL.

        Returns:
            How many holder entries were refreshed.
        """
        keys = self._live_keys()
        if keys:
            expires_at = self._clock() + self.ttl_s
            self._client.zadd(self._key(HOLDERS_KEY), dict.fromkeys(keys, expires_at))
        return len(keys)

    def fenced(self) -> list[str]:
        """This worker's held sets that a peer claimed (it took this worker for dead and handed its jobs on)."""
        keys = self._live_keys()
        if not keys:
            return []
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(self._key(fence_key(key)))
        return [key for key, exists in zip(keys, pipe.execute(), strict=True) if exists]

    # -- the claimer's side ---------------------------------------------------------------------------------------

    def expired(self, *, grace_s: float) -> list[str]:
        """Holder entries (held-set keys, unprefixed) that expired over ``grace_s`` ago and are not ours."""
        limit = self._clock() - grace_s
        raw = self._client.zrangebyscore(self._key(HOLDERS_KEY), "-inf", limit)
        ours = set(self._live_keys())
        keys = (value.decode() if isinstance(value, bytes) else str(value) for value in raw)
        return [key for key in keys if key.startswith(HELD_KEY_PREFIX) and key not in ours]

    def claim(self, held: str, *, grace_s: float) -> bool:
        """Claim an expired holder: True for exactly one caller while the entry stays expired (see step 1)."""
        now = self._clock()
        keys = (self._key(HOLDERS_KEY), self._key(fence_key(held)), self._key(held), self._key(claimed_key(held)))
        args = (held, now - grace_s, now + CLAIM_LEASE_S, now, FENCE_TTL_S)
        return int(self._client.eval(_CLAIM_SCRIPT, 4, *keys, *args)) == 1

    def restore(self, held: str) -> Restored:
        """Put the jobs of a claimed held set back on their queues (step 2), then forget the set (step 3).

        Raises:
            redis.RedisError, and whatever the result backend raises: the claim lease then runs out and the next
            claimer retries.
        """
        channel = self._restore_channel()
        restored = Restored()
        unacked_key = self._key(channel.unacked_key)
        for raw_tag in self._client.smembers(self._key(claimed_key(held))):
            tag = raw_tag.decode() if isinstance(raw_tag, bytes) else str(raw_tag)
            entry = self._client.hget(unacked_key, tag)
            if entry is None:
                restored.gone += 1
                continue
            job_id = _job_id(entry)
            if job_id is not None and self._is_final(job_id):
                channel.qos._remove_from_indices(tag).execute()
                restored.finished += 1
                continue
            channel.qos.restore_by_tag(tag)
            restored.requeued += 1
        keys = (self._key(claimed_key(held)), self._key(held), self._key(HOLDERS_KEY))
        self._client.eval(_FINISH_SCRIPT, 3, *keys, held)
        return restored

    def sweep(self, *, grace_s: float) -> Restored:
        """Claim every expired holder and restore its jobs; a failure is logged and left to the next claimer.

        Args:
            grace_s: how long past its expiry a holder must be (the producers' registry cache plus a margin, as
                for a dead worker's direct queue).

        Returns:
            What was restored.
        """
        total = Restored()
        for held in self.expired(grace_s=grace_s):
            if not self.claim(held, grace_s=grace_s):
                continue  # another worker claimed it, or its owner beat again
            try:
                restored = self.restore(held)
            except Exception as exc:
                self._close_channel()
                log.warning("could not restore the jobs of %s (a peer retries in %g s): %s", held, CLAIM_LEASE_S, exc)
                continue
            total.add(restored)
            if restored.requeued or restored.finished:
                log.warning(
                    "%s stopped heartbeating: %d job(s) back on their queues, %d finished ones dropped from unacked",
                    held.removeprefix(HELD_KEY_PREFIX),
                    restored.requeued,
                    restored.finished,
                )
        return total

    def _restore_channel(self) -> Any:
        if self._channel is None:
            self._channel = self._open_channel()
        return self._channel

    def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            try:
                channel.connection.client.release()
            except Exception as exc:  # a broken connection is dropped either way
                log.debug("closing the restore connection failed: %s", exc)

    def close(self) -> None:
        """Release the restore connection."""
        self._close_channel()


def claimed_key(held: str) -> str:
    """Where a claim moves a held set while its jobs are restored."""
    return held + ":claimed"


def _job_id(entry: bytes | str) -> str | None:
    try:
        payload = json.loads(entry)[0]
        job_id = payload["headers"]["id"]
    except (ValueError, LookupError, TypeError):
        return None  # not a Celery protocol 2 message: restore it, its consumer decides
    return job_id if isinstance(job_id, str) else None


def stop_fenced_worker(fenced: list[str]) -> None:
    """Stop this worker at once: a peer claimed ``fenced`` and handed its jobs on (see the module docstring).

    Kills the pool children first and then the parent, with SIGKILL: a warm shutdown would acknowledge or restore
    the tags it holds, which now belong to whoever runs those jobs. A supervisor (systemd, Docker's restart
    policy) starts a fresh worker.
    """
    import psutil

    log.critical(
        "this worker stopped heartbeating long enough for a peer to hand its jobs on (%s); exiting now so none runs "
        "twice: restart it",
        ", ".join(fenced),
    )
    for handler in logging.getLogger().handlers:
        handler.flush()
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            continue
    os.kill(os.getpid(), signal.SIGKILL)
