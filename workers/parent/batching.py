"""The parent's batcher: every fleet job on its way to the pool child, gathered per (task, model) into batches.

Celery hands each reserved message to its task's strategy (Celery's default: decoding, revocation, expiry, ETA,
rate limits, ``task-received`` events, the reserved list), which passes a ready request to the consumer's
``on_task_request``. For fleet tasks the worker's consumer (:mod:`gpufleet.workers.parent.consumer`) sends it here
instead of straight to the pool, so every fleet job takes one path to the child's pipeline: a job alone is a batch
of one (loads, unloads, diagnostics, and every job with batching off).

The batcher keeps one buffer per (task, model). A batch is dispatched to the pool child when

* the buffer holds the task's batch size (``fleet_batch_size``: ``GPUFLEET_BATCHING__MAX_BATCH_SIZE`` for embed and
  generate with batching on, else 1), or
* the child is idle and the oldest buffered job has waited ``max_wait_s``, or at once when the job came after a
  quiet spell of at least ``max_wait_s`` (a lone job waits for nothing), or
* the batch running in the child finishes (jobs that gathered meanwhile go next, oldest buffer first).

Delivery guarantees stay Celery's, per job: each job keeps its own ``Request``; it is acknowledged only after the
child stored its result (late ack); if the child dies, every job of its batch is rejected and requeued
(``task_reject_on_worker_lost``); a hard time limit fails every job of the batch. The child's side is
:mod:`gpufleet.workers.child.pipeline`, which this module names but never imports.

Why not celery-batches: it needs the same prefetch, acknowledges a batch whether or not each job succeeded, has no
per-job time limits or worker-lost handling, and caps Celery below 5.7.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery.worker import state as worker_state

from gpufleet.tasks.settings import BatchingOptions
from gpufleet.workers.common.jobs import PIPELINE_ENTRY, Outcome, payload_of, run_in_child
from gpufleet.workers.parent.sessions import SessionHub, continuous

log = logging.getLogger(__name__)

# How often buffered jobs look again while a job that is not a batch (a bare diagnostic task) holds the child.
BUSY_POLL_S = 0.005


def batch_size_of(request: Any) -> int | None:
    """How many of a request's task's jobs may share a batch; None for a task outside the fleet's pipeline."""
    size = getattr(request.task, "fleet_batch_size", None)
    return size if isinstance(size, int) and size >= 1 else None


def model_of(request: Any) -> str | None:
    """The model a request names (its ``model`` keyword), or None for a malformed one (it fails in the child)."""
    try:
        model = request.kwargs.get("model")
    except AttributeError:  # kwargs that are not a mapping: the contract check in the child answers it
        return None
    return model if isinstance(model, str) else None


class Batcher:
    """Buffers ready requests per (task, model) and dispatches them as batches (see the module docstring).

    Runs in the consumer's event loop only (strategy calls, timer and pool callbacks), so it needs no lock.
    """

    ATTRIBUTE = "_gpufleet_batcher"

    def __init__(self, consumer: Any, options: BatchingOptions, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.consumer = consumer
        self.connection = consumer.connection
        self.options = options
        self.clock = clock
        self._last_arrival_s = float("-inf")
        self.buffers: dict[tuple[str, str | None], list[Any]] = {}
        self.in_flight = 0
        self._timer_entry: Any = None
        self.batches_done = 0
        self.jobs_batched = 0

    @classmethod
    def for_consumer(cls, consumer: Any, options: BatchingOptions) -> Batcher:
        """The consumer's batcher; a new one after a reconnect (the old buffers' messages are redelivered)."""
        batcher: Batcher | None = getattr(consumer, cls.ATTRIBUTE, None)
        if batcher is None or batcher.connection is not consumer.connection:
            if batcher is not None and batcher.buffers:
                # Their messages belong to the lost connection: the broker hands them out again.
                log.warning("reconnected: %d buffered jobs dropped for redelivery", batcher.buffered())
            batcher = cls(consumer, options)
            setattr(consumer, cls.ATTRIBUTE, batcher)
        return batcher

    def buffered(self) -> int:
        return sum(len(requests) for requests in self.buffers.values())

    def add(self, request: Any) -> None:
        """A ready request of a fleet task (the consumer calls this instead of sending it to the pool)."""
        key = (request.name, model_of(request))
        sessions = self._sessions(request)
        if sessions is not None:
            session = sessions.current(*key)
            if session is not None:  # its model's decode loop runs: the job joins it between two steps
                if not request.revoked():
                    session.feed([request])
                return
        self.yield_child(key)
        buffer = self.buffers.setdefault(key, [])
        buffer.append(request)
        limit = self._limit(request)
        now = self.clock()
        # Wait for company only while jobs are arriving in a burst: a job after a quiet spell runs at once, so a
        # lone job costs nothing extra; the burst's jobs gather while the first one runs anyway.
        in_burst = now - self._last_arrival_s < self.options.max_wait_s
        self._last_arrival_s = now
        if len(buffer) >= limit:
            self.dispatch(key)
        else:
            self._arm_timer(self.options.max_wait_s if in_burst else 0.0)

    def _sessions(self, request: Any) -> SessionHub | None:
        """The generation sessions, for a request whose task runs in them on a worker with an event loop."""
        if not continuous(request):
            return None
        return SessionHub.for_consumer(self.consumer)

    def yield_child(self, key: tuple[str, str | None] | None = None) -> None:
        """Other work waits for the child: a running session (for another key) admits nothing more and ends."""
        hub: SessionHub | None = getattr(self.consumer, SessionHub.ATTRIBUTE, None)
        if hub is not None and hub.session is not None and hub.session.key != key:
            hub.session.close()

    def _limit(self, request: Any) -> int:
        """Jobs per batch for this request's task: its own batch size, within ``max_batch_size``."""
        return max(1, min(batch_size_of(request) or 1, self.options.max_batch_size))

    def child_busy(self) -> bool:
        """Whether the pool child runs something: one of our batches, or any other job (a load, a diag task)."""
        return self.in_flight > 0 or bool(worker_state.active_requests)

    def _arm_timer(self, delay_s: float) -> None:
        if self._timer_entry is not None or self.in_flight > 0:
            return  # a timer is pending, or the running batch's end dispatches the next one
        if delay_s <= 0 and not self.child_busy():
            self.dispatch_oldest()
            return
        self._timer_entry = self.consumer.timer.call_after(max(delay_s, 0.0), self._on_timer)

    def _on_timer(self) -> None:
        self._timer_entry = None
        if not self.buffers:
            return
        if self.child_busy():
            # Another job holds the child (ours end with a callback, others do not): look again shortly, so
            # the buffered jobs stay revocable and gather company until the child is free.
            self._arm_timer(BUSY_POLL_S)
            return
        self.dispatch_oldest()

    def dispatch_oldest(self) -> None:
        """Dispatch the buffer whose first job has waited longest."""
        if not self.buffers:
            return
        self.dispatch(next(iter(self.buffers)))  # dicts keep insertion order: the first is the oldest buffer

    def dispatch(self, key: tuple[str, str | None]) -> None:
        """Send up to the task's batch size of one buffer's jobs to the pool as one batch."""
        buffer = self.buffers.pop(key, [])
        limit = self._limit(buffer[0]) if buffer else 1
        requests, rest = buffer[:limit], buffer[limit:]
        if rest:
            self.buffers[key] = rest
        # revoked() answers a job revoked or expired while it waited (stores REVOKED, acknowledges it).
        requests = [request for request in requests if not request.revoked()]
        if not requests:
            self._next()
            return
        self.in_flight += 1
        self.jobs_batched += len(requests)
        sessions = self._sessions(requests[0])
        if sessions is not None:
            more = [request for request in self.buffers.pop(key, []) if not request.revoked()]
            sessions.start(requests + more, self._on_batch_done)  # every buffered job of the model: one loop
            return
        BatchRun(requests, self._on_batch_done).submit(self.consumer.pool)

    def _on_batch_done(self) -> None:
        self.in_flight -= 1
        self.batches_done += 1
        self._next()

    def _next(self) -> None:
        # Jobs that gathered while the child was busy have waited already: no extra delay for them.
        if self.in_flight == 0 and self.buffers:
            if self._timer_entry is not None:
                self._timer_entry.cancel()
                self._timer_entry = None
            self._arm_timer(0.0)


class BatchRun:
    """One batch in the pool: Celery's per-request callbacks, called for every job of the batch."""

    def __init__(self, requests: list[Any], on_done: Callable[[], None]) -> None:
        self.requests = requests
        self.on_done = on_done
        self.submitted_at = time.monotonic()

    def submit(self, pool: Any) -> None:
        first = self.requests[0]
        hard_s, soft_s = _limits(self.requests)
        pool.apply_async(
            run_in_child,
            args=(PIPELINE_ENTRY, first.name, [payload_of(request) for request in self.requests]),
            accept_callback=self.on_accepted,
            timeout_callback=self.on_timeout,
            callback=self.on_return,
            error_callback=self.on_failure,
            soft_timeout=soft_s,
            timeout=hard_s,
            correlation_id=first.id,
        )

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        self._each(lambda request: request.on_accepted(pid, time_accepted))

    def on_timeout(self, soft: bool, timeout: float) -> None:
        self._each(lambda request: request.on_timeout(soft, timeout))

    def on_return(self, outcomes: list[Outcome]) -> None:
        """The child's per-job outcomes, in request order: Celery's ``on_success`` acknowledges each."""
        try:
            if len(outcomes) != len(self.requests):  # cannot happen unless the child's code is broken
                raise RuntimeError(f"batch returned {len(outcomes)} outcomes for {len(self.requests)} jobs")
            for request, outcome in zip(self.requests, outcomes, strict=True):
                self._guarded(request, _success_handler(outcome))
        finally:
            self.on_done()

    def on_failure(self, exc_info: Any, **kwargs: Any) -> None:
        """The batch as a whole failed (child lost, hard time limit): each job gets Celery's handling."""
        try:
            self._each(lambda request: request.on_failure(exc_info, **kwargs))
        finally:
            self.on_done()

    def _each(self, call: Callable[[Any], None]) -> None:
        for request in self.requests:
            self._guarded(request, call)

    @staticmethod
    def _guarded(request: Any, call: Callable[[Any], None]) -> None:
        # One job's bookkeeping failing must not leave the rest of the batch unacknowledged.
        try:
            call(request)
        except Exception:
            log.exception("batch bookkeeping failed for job %s", request.id)


def _success_handler(outcome: Outcome) -> Callable[[Any], None]:
    return lambda request: request.on_success(outcome)


def _limits(requests: list[Any]) -> tuple[float | None, float | None]:
    """The batch's hard and soft limits: the longest any of its jobs allows (each job's own, or its task's)."""
    hard: list[float] = []
    soft: list[float] = []
    for request in requests:
        time_limit, soft_time_limit = request.time_limits
        if time_limit or request.task.time_limit:
            hard.append(float(time_limit or request.task.time_limit))
        if soft_time_limit or request.task.soft_time_limit:
            soft.append(float(soft_time_limit or request.task.soft_time_limit))
    return (max(hard) if hard else None, max(soft) if soft else None)
