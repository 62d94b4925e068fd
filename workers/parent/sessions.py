"""The parent's side of generation sessions: feed a running decode loop, acknowledge each job at its own end.

A ``fleet.generate`` job (with ``GPUFLEET_GENERATION__ENGINE=continuous``) reaches the batcher like any fleet job.
When the child is free, the batcher starts a :class:`Session`: one pool job running the child's
:func:`~gpufleet.workers.child.session.run_session` with the model's buffered jobs. While it runs, that model's
next jobs are fed to it at once over the session socket (:mod:`gpufleet.workers.common.session_wire`) instead of
waiting for a batch to end; the child answers each job when its sequence ends, after storing its result, and the
job's own Celery request is finished then (``on_success`` acknowledges it). So each job keeps Celery's per-job
guarantees:

* late acknowledgement: a job is acknowledged only after the child said its result is stored;
* a child that dies: every job the session still holds gets Celery's worker-lost handling (requeued:
  ``task_reject_on_worker_lost``), through the pool's error callback, as a batch's jobs do;
* revocation: the revoked ids Celery's control handler records are polled and the child is told to cancel the
  sequence (it stops within a step and stores ``REVOKED``); soft time limits are the child's (it checks between
  steps), hard limits the parent's: the job fails as Celery's hard limit fails it and the stuck child is killed
  (its other jobs are requeued);
* warm shutdown: the session is drained: jobs not yet admitted are given back to the broker, running ones finish.

The session gives the child back when the loop is empty and nothing was fed since it said so, or at once (after
its running sequences) when other work is waiting for the child. Parent side only: it never imports the child.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from billiard.einfo import ExceptionInfo
from celery import signals
from celery.exceptions import Ignore
from celery.worker import state as worker_state

from gpufleet.tasks import errors
from gpufleet.workers.common.jobs import payload_of, run_in_child
from gpufleet.workers.common.session_wire import (
    SESSION_ENTRY,
    Answer,
    LineReader,
    encode,
    new_address,
    new_token,
    payload_to_wire,
)

log = logging.getLogger(__name__)

REVOKE_POLL_S = 0.05  # how often the revoked ids are checked against the session's jobs
LINGER_S = 0.05  # how long an empty session stays open for its model's next job (when nothing else waits)


def continuous(request: Any) -> bool:
    """Whether a request's task runs in generation sessions (set at registration; duck-typed)."""
    return getattr(request.task, "fleet_continuous", False) is True


class SessionHub:
    """The parent's listening socket and the session running now (one at a time: the pool has one child)."""

    ATTRIBUTE = "_gpufleet_sessions"

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.hub = consumer.hub
        self.address = new_address()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.address)
        self.listener.listen(8)
        self.listener.setblocking(False)
        self.hub.add_reader(self.listener.fileno(), self._on_accept)
        self.session: Session | None = None
        signals.worker_shutting_down.connect(self._on_shutting_down, weak=False)

    @classmethod
    def for_consumer(cls, consumer: Any) -> SessionHub | None:
        """The consumer's hub; None without an event loop (sessions need it: such a worker uses batches)."""
        if getattr(consumer, "hub", None) is None:
            return None
        hub: SessionHub | None = getattr(consumer, cls.ATTRIBUTE, None)
        if hub is None:
            hub = cls(consumer)
            setattr(consumer, cls.ATTRIBUTE, hub)
        return hub

    def start(self, requests: list[Any], on_done: Callable[[], None]) -> Session:
        session = Session(self, requests, on_done)
        self.session = session
        session.submit(self.consumer.pool)
        return session

    def current(self, task_name: str, model: str | None) -> Session | None:
        """The running session when it takes jobs of ``task_name`` for ``model`` now."""
        session = self.session
        if session is not None and session.accepting and session.key == (task_name, model):
            return session
        return None

    def _on_accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        reader = LineReader()
        self.hub.add_reader(conn.fileno(), self._on_readable, conn, reader)

    def _on_readable(self, conn: socket.socket, reader: LineReader) -> None:
        try:
            data = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        try:
            messages = reader.feed(data)
        except ValueError:
            log.warning("dropping a session connection that sent something other than JSON lines")
            self._drop(conn)
            return
        for message in messages:
            session = self.session
            if message.get("t") == "hello":
                if session is None or message.get("token") != session.token:
                    log.warning("dropping a session connection with an unknown token")
                    self._drop(conn)
                    return
                session.attach(conn)
            elif session is not None and session.conn is conn:
                session.on_message(message)

    def _drop(self, conn: socket.socket) -> None:
        with contextlib.suppress(Exception):
            self.hub.remove_reader(conn.fileno())
        with contextlib.suppress(OSError):
            conn.close()
        if self.session is not None and self.session.conn is conn:
            self.session.conn = None

    def _on_shutting_down(self, **_: Any) -> None:
        if self.session is not None:
            self.session.drain()

    def ended(self, session: Session) -> None:
        if session.conn is not None:
            self._drop(session.conn)
        if self.session is session:
            self.session = None


class Session:
    """One generation session in the pool child, and the Celery requests of the jobs it holds."""

    def __init__(self, hub: SessionHub, requests: list[Any], on_done: Callable[[], None]) -> None:
        self.hub = hub
        first = requests[0]
        self.key: tuple[str, str | None] = (first.name, _model_of(first))
        self.token = new_token()
        self.pending: dict[str, Any] = {request.id: request for request in requests}
        self.initial = list(requests)
        self.on_done = on_done
        self.conn: socket.socket | None = None
        self._unsent: list[bytes] = []  # messages written before the child connected
        self.feeds_sent = 0
        self.accepting = True
        self.pid: int | None = None
        self._hard_timers: dict[str, Any] = {}
        self._cancelled: set[str] = set()
        self._revoke_poll: Any = None
        self._linger: Any = None
        self._ended = False

    # -- the pool job ---------------------------------------------------------------------------------------

    def submit(self, pool: Any) -> None:
        pool.apply_async(
            run_in_child,
            args=(SESSION_ENTRY, self.hub.address, self.token, self.key[0], [payload_of(r) for r in self.initial]),
            accept_callback=self.on_accepted,
            callback=self.on_return,
            error_callback=self.on_failure,
            correlation_id=self.initial[0].id,
        )

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        self.pid = pid
        for request in list(self.pending.values()):
            self._accepted(request, time_accepted)
        self._revoke_poll = self.hub.consumer.timer.call_repeatedly(REVOKE_POLL_S, self._poll_revoked)

    def on_return(self, answers: list[dict[str, Any]]) -> None:
        """The session ended: finish every job the socket did not (the list holds every answer)."""
        try:
            for data in answers:
                self._finish(Answer(**data))
            if self.pending:  # cannot happen unless the child's code is broken: let Celery requeue them
                log.error("a generation session ended without answering %d job(s); requeueing them", len(self.pending))
                for request in self._take_pending():
                    _guarded(request, lambda r: r.reject(requeue=True))
        finally:
            self._end()

    def on_failure(self, exc_info: Any, **kwargs: Any) -> None:
        """The session's process died (or its code raised): each job it held gets Celery's own handling."""
        try:
            for request in self._take_pending():
                _guarded(request, lambda r: r.on_failure(exc_info, **kwargs))
        finally:
            self._end()

    # -- the socket -----------------------------------------------------------------------------------------

    def attach(self, conn: socket.socket) -> None:
        self.conn = conn
        unsent, self._unsent = self._unsent, []
        for data in unsent:
            self._write(data)

    def on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("t")
        if kind == "done":
            self._finish(Answer.from_wire(message))
        elif kind == "idle" and int(message.get("fed", -1)) == self.feeds_sent and not self.pending:
            # Kept open a moment: the next job for this model (a caller's next request) joins the open session
            # instead of waiting for this one to end and another to start. Other work closes it at once.
            self._cancel_linger()
            self._linger = self.hub.consumer.timer.call_after(LINGER_S, self._close_if_idle, (self.feeds_sent,))

    def _send(self, message: dict[str, Any]) -> None:
        data = encode(message)
        if self.conn is None:
            self._unsent.append(data)
        else:
            self._write(data)

    def _write(self, data: bytes) -> None:
        assert self.conn is not None
        try:
            # Small messages on a local socket: a blocking write (of a full buffer) would stall the event loop,
            # so the socket is switched to blocking only for this write's duration.
            self.conn.setblocking(True)
            self.conn.sendall(data)
        except OSError:
            log.warning("the generation session's socket is gone; its jobs are answered when it ends")
        finally:
            with contextlib.suppress(OSError):
                self.conn.setblocking(False)

    # -- feeding and ending -----------------------------------------------------------------------------------

    def feed(self, requests: list[Any]) -> None:
        """More jobs for the running loop (they join it between two steps)."""
        requests = [request for request in requests if request.id not in self.pending]
        if not requests:
            return
        for request in requests:
            self.pending[request.id] = request
            if self.pid is not None:
                self._accepted(request, time.monotonic())
        self._cancel_linger()
        self.feeds_sent += 1
        self._send({"t": "feed", "seq": self.feeds_sent, "jobs": [payload_to_wire(payload_of(r)) for r in requests]})

    def _close_if_idle(self, feeds_sent: int) -> None:
        self._linger = None
        if feeds_sent == self.feeds_sent and not self.pending:
            self.close()

    def _cancel_linger(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None

    def close(self) -> None:
        """Admit nothing more: the child finishes what runs and ends the session."""
        self._cancel_linger()
        if self.accepting:
            self.accepting = False
            self._send({"t": "close"})

    def drain(self) -> None:
        """The worker shuts down: unstarted jobs come back as "requeue", running ones finish."""
        self.accepting = False
        self._send({"t": "drain"})

    def _accepted(self, request: Any, time_accepted: float) -> None:
        assert self.pid is not None
        _guarded(request, lambda r: r.on_accepted(self.pid, time_accepted))
        hard_s = request.time_limits[0] or request.task.time_limit
        if hard_s:
            self._hard_timers[request.id] = self.hub.consumer.timer.call_after(
                float(hard_s), self._hard_limit, (request.id, float(hard_s))
            )

    def _poll_revoked(self) -> None:
        revoked = [
            job_id for job_id in self.pending if job_id in worker_state.revoked and job_id not in self._cancelled
        ]
        for job_id in revoked:
            self._cancelled.add(job_id)
            self._send({"t": "cancel", "id": job_id, "reason": "revoked"})

    def _hard_limit(self, job_id: str, hard_s: float) -> None:
        request = self.pending.pop(job_id, None)
        if request is None:
            return
        self._hard_timers.pop(job_id, None)
        _guarded(request, lambda r: r.on_timeout(False, hard_s))
        if self.pid is not None:
            # Past its hard limit the sequence is not between steps (they check their soft limits): the child is
            # stuck. Killed, its other jobs get the worker-lost handling (requeued) through on_failure.
            log.error("job %s passed its hard time limit of %g s; killing the pool child %d", job_id, hard_s, self.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def _finish(self, answer: Answer) -> None:
        request = self.pending.pop(answer.id, None)
        if request is None:
            return  # answered already (by the socket, or a hard limit)
        timer = self._hard_timers.pop(answer.id, None)
        if timer is not None:
            timer.cancel()
        _guarded(request, lambda r: _complete(r, answer))

    def _take_pending(self) -> list[Any]:
        requests, self.pending = list(self.pending.values()), {}
        for timer in self._hard_timers.values():
            timer.cancel()
        self._hard_timers = {}
        return requests

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        self.accepting = False
        self._cancel_linger()
        if self._revoke_poll is not None:
            self._revoke_poll.cancel()
        self.hub.ended(self)
        self.on_done()


def _complete(request: Any, answer: Answer) -> None:
    """Finish a job's Celery request the way its answer says (its result is already stored)."""
    kind = answer.kind
    if kind == "ok":
        request.on_success((False, answer.result_repr, answer.runtime_s))
    elif kind == "error":
        request.on_success((True, _exception_info(_contract_error(answer)), answer.runtime_s))
    elif kind == "ignore":  # re-sent to another queue under the same id
        request.on_success((True, _exception_info(Ignore()), answer.runtime_s))
    elif kind == "revoked":
        worker_state.task_ready(request)
        request.send_event("task-revoked", terminated=False, signum=None, expired=False)
        request.acknowledge()
        request._already_revoked = True
        signals.task_revoked.send(
            sender=request.task, request=request._context, terminated=False, signum=None, expired=False
        )
    elif kind == "requeue":
        worker_state.task_ready(request)
        request.reject(requeue=True)


def _contract_error(answer: Answer) -> BaseException:
    error_type = getattr(errors, answer.error_type, None)
    if isinstance(error_type, type) and issubclass(error_type, errors.JobError):
        return error_type(answer.error_message)
    return errors.JobError(answer.error_message or f"{answer.error_type} (see the worker log)")


def _exception_info(exc: BaseException) -> ExceptionInfo:
    try:
        raise exc
    except BaseException:
        return ExceptionInfo()


def _model_of(request: Any) -> str | None:
    try:
        model = request.kwargs.get("model")
    except AttributeError:
        return None
    return model if isinstance(model, str) else None


def _guarded(request: Any, call: Callable[[Any], None]) -> None:
    # One job's bookkeeping failing must not leave the session's other jobs unanswered.
    try:
        call(request)
    except Exception:
        log.exception("session bookkeeping failed for job %s", request.id)
