"""What every job records about itself, kept off its critical path: deferred state publishing, delivery counts.

A job on a resident model takes milliseconds, so its bookkeeping must cost microseconds:

* :class:`DeferredCall` coalesces the snapshot writes a job's start and end ask for into one write on a
  background thread, once the worker has been quiet for a moment (``quiet_s``) and at the latest ``max_delay_s``
  after the first unwritten change. A job of a few milliseconds is never written as running; one that runs
  longer is, ``quiet_s`` after it started. Changes to what the worker holds (loads, evictions, unloads) do not
  wait: :meth:`gpufleet.workers.child.runtime.WorkerRuntime.changed` writes them before the job's result is stored, so a
  caller who got the result sees them in the status commands at once.
* :func:`count_delivery` counts only *re*-deliveries. Both Redis (kombu marks every message it restores) and
  RabbitMQ flag a message delivered again as ``redelivered``, so a first delivery, the common case, costs no
  round trip; a redelivered job pays one (INCR and EXPIRE, pipelined).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from gpufleet.tasks.fleet import DELIVERIES_KEY

log = logging.getLogger(__name__)


class DeferredCall:
    """Runs ``fn`` on a daemon thread, once per burst of :meth:`request` calls.

    ``fn`` runs ``quiet_s`` after the last request, but no later than ``max_delay_s`` after the first request it
    has not yet served (a steady stream of jobs still publishes every ``max_delay_s``). A request costs a lock
    and, only when nothing was pending, one notify.

    Args:
        fn: what to run (exceptions are logged and dropped: the next request runs it again).
        quiet_s: how long requests must stop before ``fn`` runs.
        max_delay_s: the longest a request waits for ``fn`` to run.
        name: the thread's name.
        clock: monotonic seconds (tests pass a fake one together with :meth:`due_in_s`).

    Raises:
        ValueError: ``quiet_s`` is negative or ``max_delay_s`` is below ``quiet_s``.
    """

    def __init__(
        self,
        fn: Callable[[], None],
        *,
        quiet_s: float,
        max_delay_s: float,
        name: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if quiet_s < 0 or max_delay_s < quiet_s:
            raise ValueError(f"need 0 <= quiet_s <= max_delay_s; got quiet_s={quiet_s}, max_delay_s={max_delay_s}")
        self._fn = fn
        self.quiet_s = quiet_s
        self.max_delay_s = max_delay_s
        self._name = name
        self._clock = clock
        self._wake = threading.Condition(threading.Lock())
        self._first_at: float | None = None  # first unserved request; None when nothing is pending
        self._last_at = 0.0
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.runs = 0

    @property
    def pending(self) -> bool:
        """Whether a request waits for ``fn``."""
        return self._first_at is not None

    def request(self) -> None:
        """Ask for ``fn`` to run once things go quiet (a no-op after :meth:`stop`)."""
        with self._wake:
            if self._stopped:
                return
            now = self._clock()
            self._last_at = now
            if self._first_at is None:
                self._first_at = now
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                    self._thread.start()
                self._wake.notify()

    def cancel(self) -> None:
        """Forget pending requests (the caller is about to do what ``fn`` does itself)."""
        with self._wake:
            self._first_at = None

    def flush(self) -> bool:
        """Run ``fn`` now, in the caller's thread, if a request is pending; returns whether it ran."""
        with self._wake:
            if self._first_at is None:
                return False
            self._first_at = None
        self._run()
        return True

    def due_in_s(self) -> float | None:
        """Seconds until ``fn`` is due (0 when overdue), or None when nothing is pending."""
        with self._wake:
            return self._due_in_s_locked()

    def stop(self) -> None:
        """Stop the thread; pending requests are dropped (call :meth:`flush` first to keep them)."""
        with self._wake:
            self._stopped = True
            self._first_at = None
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)

    def _due_in_s_locked(self) -> float | None:
        if self._first_at is None:
            return None
        due_at = min(self._last_at + self.quiet_s, self._first_at + self.max_delay_s)
        return max(0.0, due_at - self._clock())

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopped:
                    wait_s = self._due_in_s_locked()
                    if wait_s == 0.0:
                        break
                    self._wake.wait(timeout=wait_s)  # None: sleep until a request arrives
                if self._stopped:
                    return
                self._first_at = None
            self._run()

    def _run(self) -> None:
        try:
            self._fn()
        except Exception:  # publishing is housekeeping: log it, the next request tries again
            log.exception("%s failed", self._name)
        self.runs += 1


def count_delivery(
    client: Any, job_id: str, *, redelivered: bool, ttl_s: float, max_deliveries: int
) -> tuple[int, bool]:
    """How many times ``job_id`` has been delivered, and whether that exceeds ``max_deliveries``.

    A first delivery is counted without asking Redis; a redelivery increments the job's counter (one pipelined
    INCR + EXPIRE) and counts as that many plus the first.

    Args:
        client: a Redis client (the result backend's).
        job_id: the job's id.
        redelivered: the broker's ``redelivered`` flag for this delivery.
        ttl_s: how long the counter lives (beyond any redelivery of the job: twice the visibility timeout).
        max_deliveries: deliveries allowed.

    Returns:
        ``(deliveries, too_many)``.

    Raises:
        Exception: whatever the Redis client raises (the caller decides that counting is best effort).
    """
    if not redelivered:
        return 1, max_deliveries < 1
    key = DELIVERIES_KEY.format(job_id=job_id)
    pipe = client.pipeline(transaction=False)
    pipe.incr(key)
    pipe.expire(key, max(1, round(ttl_s)))
    deliveries = 1 + int(pipe.execute()[0])
    return deliveries, deliveries > max_deliveries
