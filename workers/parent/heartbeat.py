"""The worker's heartbeat: its parent process tells the fleet registry who it is and what it holds.

The parent (which never imports torch) publishes a :class:`~gpufleet.tasks.fleet.WorkerRecord` every
``GPUFLEET_FLEET__HEARTBEAT_INTERVAL_S`` with a TTL of ``GPUFLEET_FLEET__HEARTBEAT_TTL_S``, built from its identity
and the snapshot the pool child keeps writing (:mod:`gpufleet.workers.common.context`), so it reports the child's
models, memory and running job even while a long job holds the child. It starts on Celery's ``worker_ready`` and stops
on ``worker_shutdown``; a failed beat (a Redis blip) is logged and retried on the next tick, never fatal.

A graceful stop marks the record ``draining`` at once, on ``worker_shutting_down`` (the router skips the worker from
then on), and the worker keeps beating while its running jobs finish: stopping the beats then would let a peer take
it for dead and restore jobs it is still running. It leaves the registry on ``worker_shutdown``, when they are done.

No job may wait on a queue nobody consumes. A worker's direct queue is moved back to its type queue:

- by the worker itself on a graceful stop (after Celery gave back its unacknowledged jobs);
- by whichever live worker claims it once its heartbeat expired (a kill -9 leaves no chance to do it itself);
- by every live worker, each tick, for workers that left recently: kombu gives a job back (consumer lost,
  visibility timeout) to the queue it was first sent to, even after it was moved.

Only Redis brokers have lists to move. Over RabbitMQ, whoever claims a dead worker starts consuming its direct
queue instead (``add_consumer`` to itself): RabbitMQ puts the dead consumer's unacknowledged jobs back on that queue
at once, and the claimer serves them.

On a Redis broker the heartbeat also keeps this worker's held-delivery records alive and restores those of dead
holders (:mod:`gpufleet.workers.parent.recovery`): a killed worker's unacknowledged jobs go back to their queues about
``heartbeat_ttl_s`` after its last beat. RabbitMQ needs none of it: it requeues a lost consumer's messages itself.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from gpufleet.tasks.fleet import FleetRegistry, HeldModel, WorkerRecord
from gpufleet.workers.common.context import context as worker_context
from gpufleet.workers.common.snapshot import ParkedModel, ResidentModel, WorkerSnapshot
from gpufleet.workers.parent.broker_queues import BrokerQueues
from gpufleet.workers.parent.recovery import Recovery, Restored, stop_fenced_worker

if TYPE_CHECKING:
    from gpufleet.tasks.settings import Settings
    from gpufleet.workers.common.identity import WorkerIdentity

log = logging.getLogger(__name__)

VERSIONED_PACKAGES = ("gpufleet", "celery", "kombu", "torch", "transformers")
# Between a producer's routing decision and its job landing on a queue: a claimer waits this long past a dead
# worker's expiry (plus the producers' registry cache) so no job routed from a stale snapshot lands after the move.
SEND_MARGIN_S = 0.5


def package_versions(packages: Sequence[str] = VERSIONED_PACKAGES) -> dict[str, str]:
    """Installed versions from package metadata (nothing is imported: the parent must not load torch)."""
    versions = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _held(entries: list[ResidentModel] | list[ParkedModel]) -> tuple[HeldModel, ...]:
    return tuple(HeldModel(model=e.model, bytes=e.bytes, pinned=getattr(e, "pinned", False)) for e in entries)


def held_unstarted() -> int:
    """Jobs this worker process has reserved and not started (the parent's own bookkeeping, no round trip)."""
    from celery.worker import state as worker_state

    active = worker_state.active_requests
    return sum(1 for request in list(worker_state.reserved_requests) if request not in active)


def build_record(
    identity: WorkerIdentity,
    snapshot: WorkerSnapshot,
    *,
    ttl_s: float,
    now: float,
    backlog: int = 0,
    draining: bool = False,
    host: str | None = None,
    pid: int | None = None,
    versions: Mapping[str, str] | None = None,
    since: float | None = None,
) -> WorkerRecord:
    """The heartbeat record of a worker, from its identity and its pool child's snapshot.

    Args:
        identity: who the worker is (name, GPU type and indices, device, queues, device memory).
        snapshot: the pool child's last snapshot; its missing sections read as "not ready, nothing held".
        ttl_s: how long the record stays valid without another heartbeat.
        now: seconds since the epoch (the heartbeat's time).
        backlog: jobs waiting on the worker's direct queue.
        draining: the worker is stopping: it takes no new jobs.
        host: host name (default this host's).
        pid: the parent's process id (default this process's).
        versions: package versions (see :func:`package_versions`).
        since: when this worker's parent started; a snapshot written before it is a previous run's and is ignored.

    Returns:
        The record to publish.
    """
    if since is not None and snapshot.updated_at < since:
        # Left by a previous worker of this name: its models and readiness are not ours.
        snapshot = WorkerSnapshot(worker=identity.name, updated_at=snapshot.updated_at)
    pool = snapshot.gpu.memory_pool if snapshot.gpu is not None else None
    cache = snapshot.cache
    parked = cache.parked.entries if cache is not None and cache.parked is not None else []
    type_queue, direct_queue = identity.queues
    return WorkerRecord(
        name=identity.name,
        host=host or socket.gethostname(),
        pid=os.getpid() if pid is None else pid,
        gpu_type=identity.gpu_type,
        gpu_indices=identity.gpu_indices,
        gpu_count=identity.gpu_count,
        device=identity.device_label,
        type_queue=type_queue,
        direct_queue=direct_queue,
        memory_total_bytes=identity.memory_bytes,
        memory_budget_bytes=max(0, pool.budget_bytes) if pool else 0,
        memory_used_bytes=max(0, pool.resident_bytes) if pool else 0,
        resident=_held(snapshot.models.loaded),
        parked=_held(parked),
        ready=snapshot.ready,
        warm=snapshot.gpu is not None and snapshot.gpu.warm,
        draining=draining,
        running_job=snapshot.running_job,
        backlog=backlog,
        jobs_done=max(0, snapshot.jobs_done),
        jobs_by_outcome=dict(snapshot.metrics.jobs_by_outcome),
        load_s_buckets=dict(snapshot.metrics.load_s_buckets),
        load_s_sum=snapshot.metrics.load_s_sum,
        generation=dict(snapshot.metrics.generation),
        cache_hits=cache.stats.hits if cache else 0,
        cache_misses=cache.stats.misses if cache else 0,
        cache_evictions=cache.stats.evictions if cache else 0,
        versions=dict(versions or {}),
        heartbeat_at=now,
        ttl_s=ttl_s,
    )


# -- the heartbeat ---------------------------------------------------------------------------------------------


class Heartbeat:
    """Publishes one worker's record on a timer thread and looks after the direct queues of workers that left.

    Args:
        identity: the worker.
        settings: its settings (``fleet.*``, ``broker.visibility_timeout_s``).
        registry: the fleet registry.
        queues: the broker's lists, or None when the broker is not Redis.
        read_snapshot: the pool child's last snapshot (parent side).
        since: when the worker's parent started (older snapshots are a previous run's).
        clock: seconds since the epoch.
        recovery: restores dead holders' jobs (Redis broker), or None.
        on_fenced: called with the held sets a peer claimed when this worker wakes from a freeze longer than its
            TTL (default :func:`gpufleet.workers.parent.recovery.stop_fenced_worker`, which does not return).
        adopt: start consuming a dead worker's direct queue (a broker without lists to move: RabbitMQ), or None.
    """

    def __init__(
        self,
        identity: WorkerIdentity,
        settings: Settings,
        registry: FleetRegistry,
        queues: BrokerQueues | None,
        read_snapshot: Callable[[], WorkerSnapshot],
        *,
        since: float | None = None,
        clock: Callable[[], float] = time.time,
        recovery: Recovery | None = None,
        on_fenced: Callable[[list[str]], None] = stop_fenced_worker,
        adopt: Callable[[str], None] | None = None,
    ) -> None:
        self.identity = identity
        self.settings = settings
        self.registry = registry
        self.queues = queues
        self._read_snapshot = read_snapshot
        self._since = since
        self._clock = clock
        self._versions = package_versions()
        self._stop = threading.Event()
        self._wake = threading.Event()  # beat now, not at the next tick (set from a signal handler: no I/O there)
        self.draining = False
        self._thread: threading.Thread | None = None
        self._failing = False
        self.recovery = recovery
        self._on_fenced = on_fenced
        self._adopt = adopt
        self._last_ok: float | None = None  # when the last beat was published
        self._ok_since: float | None = None  # start of the current run of beats without a gap longer than the TTL
        self.restored = Restored()  # jobs this worker restored for dead holders, since it started

    def record(self) -> WorkerRecord:
        """This worker's record now (reads the snapshot and, on Redis, its direct queue's length)."""
        backlog = 0 if self.queues is None else self.queues.backlog(self.identity.queues[1])
        # Jobs ahead of a new one also include those this worker reserved but has not started (with batching it
        # reserves up to two batches' worth), or a worker that looks idle to the router would be sent more.
        backlog += held_unstarted()
        return build_record(
            self.identity,
            self._read_snapshot(),
            ttl_s=self.settings.fleet.heartbeat_ttl_s,
            now=self._clock(),
            backlog=backlog,
            draining=self.draining,
            versions=self._versions,
            since=self._since,
        )

    def beat(self) -> None:
        """Publish the record, then move the direct queues of workers that died or left and restore their jobs.

        After a gap longer than the TTL (the process was frozen, or Redis unreachable) it first checks whether a
        peer claimed this worker meanwhile; if so it calls ``on_fenced`` instead of beating on.

        Raises:
            BrokerUnavailableError: the registry did not answer (redis errors from the broker's lists likewise).
        """
        now = self._clock()
        if self._last_ok is not None and now - self._last_ok > self.settings.fleet.heartbeat_ttl_s:
            self._ok_since = None  # our view of the fleet is stale until we have beaten for a whole TTL again
            fenced = [] if self.recovery is None else self.recovery.fenced()
            if fenced:
                self._on_fenced(fenced)
                return
        try:
            self.registry.publish(self.record())
            if self.recovery is not None:
                self.recovery.refresh()
        except Exception:
            self._ok_since = None
            raise
        self._last_ok = now
        if self._ok_since is None:
            self._ok_since = now
        self.sweep()

    @property
    def trusted(self) -> bool:
        """Whether this worker has beaten without a gap for a whole TTL: only then may it take a peer for dead.

        After a Redis outage every record looks expired; a live peer gets a TTL to beat again before anyone
        claims its jobs.
        """
        return self._ok_since is not None and self._clock() - self._ok_since >= self.settings.fleet.heartbeat_ttl_s

    def sweep(self) -> int:
        """Claim workers whose heartbeat expired and move their direct queues, and what landed on departed ones.

        On a Redis broker, once :attr:`trusted`, it also restores the jobs of expired holders (see
        :mod:`gpufleet.workers.parent.recovery`; counted in :attr:`restored`).

        Returns:
            How many jobs were moved.
        """
        grace_s = self.settings.fleet.registry_cache_s + SEND_MARGIN_S
        moved = 0
        for name in self.registry.expired(grace_s=grace_s):
            if name == self.identity.name:
                continue  # our own beats failed for a while; we are back and consume our queue ourselves
            claimed = self.registry.claim_expired(name, grace_s=grace_s)
            if claimed is None:
                continue  # another worker claimed it, or it heartbeats again
            log.warning("worker %s stopped heartbeating; it left the fleet", name)
            if self.queues is not None and claimed.direct_queue and claimed.type_queue:
                moved += self._move(claimed.direct_queue, claimed.type_queue, f"worker {name} died")
            elif self.queues is None and self._adopt is not None and claimed.direct_queue:
                log.warning("worker %s died: %s now consumes its direct queue", name, self.identity.name)
                self._adopt(claimed.direct_queue)
        if self.recovery is not None and self.trusted:
            # Restored jobs first sent to a direct queue land there again: the departed-queue pass below moves them.
            self.restored.add(self.recovery.sweep(grace_s=grace_s))
        if self.queues is None:
            return moved
        # Kept as long as kombu may still give back a job first sent there (its visibility timeout, twice).
        retention_s = 2 * self.settings.broker.visibility_timeout_s
        for departed in self.registry.departed(retention_s=retention_s):
            if departed.direct_queue and departed.type_queue and self.queues.backlog(departed.direct_queue):
                moved += self._move(departed.direct_queue, departed.type_queue, f"worker {departed.name} left")
        return moved

    def _move(self, source: str, target: str, why: str) -> int:
        assert self.queues is not None
        moved = self.queues.drain(source, target)
        if moved:
            log.warning("%s: moved %d job(s) from its direct queue %s to %s", why, moved, source, target)
        return moved

    def tick(self) -> bool:
        """One beat that never raises: a failure is logged (once until it recovers) and retried next tick."""
        try:
            self.beat()
        except Exception as exc:
            if not self._failing:
                log.warning(
                    "heartbeat of %s failed (retrying every %g s): %s", self.identity.name, self.interval_s, exc
                )
            self._failing = True
            return False
        if self._failing:
            log.info("heartbeat of %s published again", self.identity.name)
        self._failing = False
        return True

    @property
    def interval_s(self) -> float:
        return self.settings.fleet.heartbeat_interval_s

    def start(self) -> None:
        """Beat at once, then every ``interval_s`` on a daemon thread."""
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.is_set():
                self.tick()
                self._wake.wait(self.interval_s)
                self._wake.clear()

        self._thread = threading.Thread(target=loop, name="gpufleet-heartbeat", daemon=True)
        self._thread.start()

    def drain(self) -> None:
        """The worker is stopping: publish ``draining`` now (from the beat thread) and keep beating until
        :meth:`stop`, so the router sends nothing new while no peer takes the running jobs for a dead worker's.

        Safe to call from a signal handler: it only sets flags and wakes the beat thread.
        """
        self.draining = True
        self._wake.set()

    def stop(self) -> int:
        """Stop beating, leave the fleet at once and move our direct queue to our type queue.

        Call after Celery stopped consuming (it gives back unacknowledged jobs to the direct queue first).
        Failures are logged: a record left behind expires with its TTL and a peer then moves the queue.

        Returns:
            How many jobs were moved.
        """
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + self.settings.broker.connect_timeout_s)
        if self.recovery is not None:
            self.recovery.close()
        type_queue, direct_queue = self.identity.queues
        try:
            self.registry.remove(self.identity.name)
            return 0 if self.queues is None else self._move(direct_queue, type_queue, f"{self.identity.name} stopped")
        except Exception as exc:
            log.warning(
                "%s could not leave the fleet cleanly (its record expires in %g s): %s",
                self.identity.name,
                self.settings.fleet.heartbeat_ttl_s,
                exc,
            )
            return 0


# -- Celery signals (worker parent) ---------------------------------------------------------------------------

_heartbeat: Heartbeat | None = None


def on_worker_ready(**_: Any) -> None:
    """``worker_ready`` (parent): start the heartbeat; nothing when the broker and results have no Redis."""
    global _heartbeat
    from gpufleet.workers.parent.control import current_snapshot

    context = worker_context()
    if context is None or _heartbeat is not None:
        return
    registry = FleetRegistry.from_settings(context.settings)
    if registry is None:
        log.warning(
            "no fleet registry: neither GPUFLEET_BROKER_URL nor GPUFLEET_RESULT_BACKEND is Redis, so %s does not "
            "heartbeat and live routing cannot see it; use a Redis result backend",
            context.identity.name,
        )
        return
    queues = BrokerQueues.from_settings(context.settings, context.app.conf.broker_transport_options)
    _heartbeat = Heartbeat(
        context.identity,
        context.settings,
        registry,
        queues,
        current_snapshot,
        since=_process_started_at(),
        recovery=Recovery.from_app(context.app, context.settings),
        adopt=None if queues is not None else _adopter(context.app, context.identity.name),
    )
    _heartbeat.start()


def on_worker_shutting_down(**_: Any) -> None:
    """``worker_shutting_down`` (parent, in Celery's signal handler): mark this worker draining at once."""
    if _heartbeat is not None:
        _heartbeat.drain()


def on_worker_shutdown(**_: Any) -> None:
    """``worker_shutdown`` (parent): leave the fleet and hand the direct queue back."""
    global _heartbeat
    if _heartbeat is not None:
        _heartbeat.stop()
        _heartbeat = None


def _adopter(app: Any, name: str) -> Callable[[str], None]:
    def adopt(queue: str) -> None:
        # Through the broker like any control command, so the consumer's own event loop adds the queue.
        app.control.add_consumer(queue, destination=[name], reply=False)

    return adopt


def _process_started_at() -> float | None:
    import psutil

    try:
        return float(psutil.Process(os.getpid()).create_time())
    except psutil.Error:
        return None
