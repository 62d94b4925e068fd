"""A generation session: one model's decode loop in the pool child, fed jobs by the parent while it runs.

The parent's batcher starts a session (one pool job, :data:`~gpufleet.workers.common.session_wire.SESSION_ENTRY`)
with the ``fleet.generate`` jobs it has for a model, and feeds it that model's later jobs over the session's socket
(:mod:`gpufleet.workers.common.session_wire`). Each job goes through the same pipeline steps as any job
(:class:`~gpufleet.workers.child.pipeline.Pipeline`: delivery count, validation, ``STARTED``, the model acquired
under the OOM policy, contract errors, common result fields), then joins the loop
(:class:`~gpufleet.gpu.runtime.continuous.DecodeLoop`) between two decode steps. When a sequence ends, its result
is stored and only then is the parent told, which acknowledges that job alone: a 16-token reply is answered while
a 192-token one still runs.

Per job, between steps: a streamed job's deltas go to its token stream (:mod:`gpufleet.workers.child.streams`);
a job the parent says was revoked, or one past its soft time limit, leaves the loop and is answered (``REVOKED``,
or the soft-limit error). A device out-of-memory error the loop could not relieve fails (or re-routes) the
sequence concerned, not the session. A model the loop cannot run is served on the static path, feed by feed.

The session ends when the parent closes it (the loop is empty and nothing was fed since, or other work waits for
the child) or goes away; on a worker's warm shutdown the parent drains it: jobs not yet admitted are answered
``requeue`` (the parent gives them back to the broker), running ones finish. The pool job returns every answer
again, so a parent that missed a message on the socket still finishes every job.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from gpufleet.gpu.errors import BudgetExceededError, DeviceOutOfMemoryError
from gpufleet.gpu.runtime.continuous import (
    DecodeLoop,
    LoopEvent,
    SequenceCancelled,
    SequenceDone,
    SequenceFailed,
    SequenceRequest,
    TextDelta,
    unsupported_reason,
)
from gpufleet.tasks import streams as wire
from gpufleet.tasks.errors import CapacityError
from gpufleet.workers.child import rerouting, state
from gpufleet.workers.child.job import Job
from gpufleet.workers.child.oom_policy import give_away
from gpufleet.workers.child.pipeline import Pipeline, compute_prepared
from gpufleet.workers.child.runtime import Acquired, WorkerRuntime
from gpufleet.workers.child.streams import StreamWriter, stream_end, wants_stream
from gpufleet.workers.child.task_base import FleetTask
from gpufleet.workers.common.context import context as worker_context
from gpufleet.workers.common.jobs import JobPayload
from gpufleet.workers.common.session_wire import Answer, LineReader, encode, payload_from_wire

log = logging.getLogger(__name__)

# The last session's loop, kept for the next session of the same model (see GenerationSession._end).
_IDLE_LOOPS: dict[str, DecodeLoop] = {}
IDLE_WAIT_S = 0.5  # how long one wait for the parent's next message lasts while the loop is empty
CONNECT_TIMEOUT_S = 5.0
GAUGES_EVERY_S = 1.0  # the snapshot's running/waiting/KV gauges are refreshed at most this often while running


def run_session(address: str, token: str, task_name: str, payloads: list[JobPayload]) -> list[dict[str, Any]]:
    """The pool job of a generation session; returns every job's answer (see the module docstring)."""
    context = worker_context()
    if context is None:
        raise RuntimeError("run_session called outside a gpufleet worker's pool child")
    task = context.app.tasks[task_name]
    if not isinstance(task, FleetTask):
        raise RuntimeError(f"{task_name} is not a fleet task")
    session = GenerationSession(task, state.runtime(), _Channel.connect(address, token))
    return [asdict(answer) for answer in session.run(payloads)]


class _Channel:
    """The child's end of the session socket (blocking sends, polled receives)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = LineReader()
        self.closed = False

    @classmethod
    def connect(cls, address: str, token: str) -> _Channel | None:
        import os

        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(CONNECT_TIMEOUT_S)
            sock.connect(address)
            channel = cls(sock)
            channel.send({"t": "hello", "token": token, "pid": os.getpid()})
            return channel
        except OSError:
            # Without the channel the session still serves the jobs it started with; they are answered at its end.
            log.warning("could not connect to the worker's session socket; serving this batch alone", exc_info=True)
            return None

    def send(self, message: dict[str, Any]) -> None:
        if self.closed:
            return
        try:
            self.sock.sendall(encode(message))
        except OSError:
            self.closed = True

    def receive(self, timeout_s: float) -> list[dict[str, Any]]:
        """Messages that arrived (waiting up to ``timeout_s`` for the first; 0: just look)."""
        if self.closed:
            return []
        messages: list[dict[str, Any]] = []
        self.sock.settimeout(timeout_s if timeout_s > 0 else 0.0)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    self.closed = True  # the parent went away: finish what runs, then end
                    break
                messages += self.reader.feed(data)
                self.sock.settimeout(0.0)  # the first chunk came; take what else is there without waiting
        except (BlockingIOError, TimeoutError, InterruptedError):
            pass
        except OSError:
            self.closed = True
        return messages

    def close(self) -> None:
        self.closed = True
        self.sock.close()


@dataclass
class _Live:
    """A job in the loop: the pipeline that admitted it, and its clock."""

    pipeline: Pipeline
    job: Job
    added_at: float
    load_s: float
    soft_deadline: float | None
    stream: bool


class GenerationSession:
    """One model's decode loop and the jobs it serves (see the module docstring)."""

    def __init__(self, task: FleetTask[Any], runtime: WorkerRuntime, channel: _Channel | None) -> None:
        self.task = task
        self.runtime = runtime
        self.channel = channel
        self.options = runtime.settings.generation
        self.streams = StreamWriter(task.backend, max_entries=self.options.stream_max_entries)
        self.answers: dict[str, Answer] = {}
        self.live: dict[str, _Live] = {}
        self.loop: DecodeLoop | None = None
        self.static_reason: str | None = None  # set when the loop cannot run the model: the static path serves it
        self.model: str | None = None
        self.kv_key: str | None = None
        self.kv_reserved_bytes = 0
        self.fed = 0
        self.closing = False
        self.draining = False
        self._touched: list[Pipeline] = []
        self._to_answer: list[tuple[Pipeline, int]] = []
        self._gauges_at = 0.0
        self._looped: set[str] = set()  # jobs the loop ran: their text was streamed as it grew

    # -- the session ----------------------------------------------------------------------------------------

    def run(self, payloads: list[JobPayload]) -> list[Answer]:
        runtime = self.runtime
        runtime.begin_job(payloads[0].id, self.task.name, payloads[0].model)
        try:
            with runtime.serving():
                self._feed(payloads)
                self._serve()
        finally:
            self._end()
        return list(self.answers.values())

    def _serve(self) -> None:
        idle_told = False
        while True:
            loop = self.loop
            busy = loop is not None and not loop.idle
            if self.channel is not None:
                for message in self.channel.receive(0.0 if busy else IDLE_WAIT_S if idle_told else 0.0):
                    self._on_message(message)
            loop = self.loop
            if loop is not None and not loop.idle:
                idle_told = False
                self._check_soft_limits(loop)
                self._handle(loop.step())
                self._settle()
                self._gauges()
                continue
            if self.closing or self.draining or self.channel is None or self.channel.closed:
                return
            if not idle_told:
                self._gauges(force=True)
                self.channel.send({"t": "idle", "fed": self.fed})
                idle_told = True

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("t")
        if kind == "feed":
            self.fed = int(message.get("seq", self.fed + 1))
            payloads = [payload_from_wire(data) for data in message.get("jobs", [])]
            if payloads:
                self._feed(payloads)
        elif kind == "cancel" and self.loop is not None:
            cancelled = self.loop.cancel(str(message.get("id")), str(message.get("reason", "revoked")))
            if cancelled is not None:
                self._handle([cancelled])
                self._settle()
        elif kind == "close":
            self.closing = True
        elif kind == "drain":
            self.draining = True
            self._requeue_waiting()

    def _end(self) -> None:
        if self.kv_key is not None and self.runtime.pool is not None:
            self.runtime.pool.release(self.kv_key)
        if self.model is not None:
            self.runtime.generation.gauges(self.model, running=0, waiting=0, kv_used_bytes=0, kv_reserved_bytes=0)
            if self.loop is not None and self.loop.idle:
                # The next session for this model (often the next lone job) starts without building a loop again;
                # one idle loop per model at most, holding no cache rows (only the last prompt's prefix).
                _IDLE_LOOPS.clear()
                _IDLE_LOOPS[self.model] = self.loop
        self.loop = None
        if self.channel is not None:
            self.channel.close()
        self.runtime.job_state.request()  # published in the background: the next job need not wait for it

    # -- jobs in --------------------------------------------------------------------------------------------

    def _feed(self, payloads: list[JobPayload]) -> None:
        """Admit jobs the pipeline's way; valid ones join the loop (or run on the static path)."""
        pipeline = Pipeline(self.task, payloads, self.runtime)
        self._touched.append(pipeline)
        jobs = pipeline.admit()
        if jobs:
            model = str(jobs[0].request.model)
            acquired = pipeline.acquire(model, jobs)
            if acquired is not None:
                self._start(pipeline, acquired, model, jobs)
        self._to_answer += [(pipeline, index) for index in range(len(payloads)) if pipeline.answers[index] is not None]
        self._settle()

    def _start(self, pipeline: Pipeline, acquired: Acquired, model: str, jobs: list[Job]) -> None:
        loop = self._loop_for(acquired, model)
        ready: list[Job] = []
        for job in jobs:
            try:
                job.prepared = self.task.prepare(acquired.loaded, job.request)
            except Exception as exc:
                pipeline.fail(job.index, exc)
                continue
            ready.append(job)
        if loop is None:  # the static path: the batch of this feed, as one generate()
            if ready:
                compute_prepared(pipeline, acquired, model, ready)
            return
        now = time.monotonic()
        for job in ready:
            # Injected faults (tests of failure paths) fire on the loop's forward, as on the static path.
            self.runtime.faults.check("infer", model)
            self.runtime.faults.arm("infer", model, acquired.loaded.module)
            soft_s = _soft_limit_s(job.payload.request_dict, self.task)
            stream = bool(getattr(job.request, "stream", False))
            self.live[job.id] = _Live(pipeline, job, now, acquired.load_s, now + soft_s if soft_s else None, stream)
            loop.add(SequenceRequest(job.id, job.prepared.input_ids, job.prepared.job, stream=stream))
            self._looped.add(job.id)

    def _loop_for(self, acquired: Acquired, model: str) -> DecodeLoop | None:
        """The session's decode loop (built on the first feed), or None when the model needs the static path."""
        if self.loop is not None and self.loop.loaded is acquired.loaded:
            return self.loop
        if self.static_reason is not None:
            return None
        reason = unsupported_reason(acquired.loaded)
        if reason is not None:
            self.static_reason = reason
            log.info("%s: serving %s on the static generation path: %s", self.task.name, model, reason)
            return None
        if self.loop is not None and not self.loop.idle:
            # The model was evicted and reloaded under the running loop (an OOM elsewhere): cannot happen while
            # the loop keeps it (relieve_memory keeps it), so refuse loudly rather than mix two copies.
            raise RuntimeError(f"{model} changed under its running decode loop")
        self.model = model
        self.kv_reserved_bytes = self._reserve_kv(acquired, model)
        loop = _IDLE_LOOPS.pop(model, None)
        if loop is None or loop.loaded is not acquired.loaded or not loop.idle:
            loop = DecodeLoop(
                acquired.loaded,
                max_running=self.options.max_running,
                max_prefill_tokens=self.options.max_prefill_tokens,
                relieve_memory=lambda: self.runtime.relieve_memory(keep=model),
            )
        loop.kv_budget_bytes = self.kv_reserved_bytes
        self.loop = loop
        return loop

    def _reserve_kv(self, acquired: Acquired, model: str) -> int:
        """Reserve the loop's KV share of the free budget (``kv:<model>``); the bytes the loop may use."""
        from gpufleet.gpu.runtime.continuous import kv_bytes_per_token

        pool = self.runtime.pool
        if pool is None:
            return 0
        loaded = acquired.loaded
        config = loaded.module.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        context = int(getattr(text_config, "max_position_embeddings", 0) or 4096)
        wanted = self.options.max_running * context * kv_bytes_per_token(text_config, loaded.dtype)
        share = int(pool.free_bytes * self.options.kv_share)
        key = f"kv:{model}"
        for amount in (min(wanted, share), min(wanted, pool.free_bytes // 4)):
            try:
                pool.reserve(key, amount)
            except BudgetExceededError:
                continue
            self.kv_key = key
            self.runtime.job_state.request()  # the reservation shows in the snapshot and /gpu/status (deferred)
            return amount
        log.warning("no free budget for %s's KV cache: its sequences run one at a time", model)
        return 0

    # -- events out -----------------------------------------------------------------------------------------

    def _handle(self, events: list[LoopEvent]) -> None:
        for event in events:
            if isinstance(event, TextDelta):
                self.streams.add(event.key, wire.delta_fields(event.text, event.completion_tokens))
                continue
            live = self.live.pop(event.key, None)
            if live is None:
                continue
            pipeline, job = live.pipeline, live.job
            if isinstance(event, SequenceDone):
                self._done(live, event)
            elif isinstance(event, SequenceFailed):
                self._failed(live, event)
            elif isinstance(event, SequenceCancelled):
                if event.reason == "soft-time-limit":
                    pipeline.fail(job.index, SoftTimeLimitExceeded())
                else:
                    pipeline.revoke(job.index, event.reason)
            self._to_answer.append((pipeline, job.index))

    def _done(self, live: _Live, event: SequenceDone) -> None:
        pipeline, job = live.pipeline, live.job
        generation = event.generation
        assert self.model is not None
        self.runtime.generation.finished(
            self.model,
            prompt_tokens=generation.prompt_tokens,
            prefill_tokens=event.prefill_tokens,
            generated_tokens=generation.completion_tokens,
            first_token_s=event.first_token_s,
            inter_token_s=event.inter_token_s,
        )
        try:
            fields = self.task.result_fields(job.request, generation)
        except Exception as exc:
            pipeline.fail(job.index, exc)
            return
        compute_s = max(0.0, time.monotonic() - live.added_at - event.queued_s)
        running = self.loop.running + 1 if self.loop is not None else 1
        pipeline.succeed(job, fields, load_s=live.load_s, compute_s=compute_s, batch_size=running)

    def _failed(self, live: _Live, event: SequenceFailed) -> None:
        """The one OOM policy, for this sequence: the loop already relieved memory and retried; re-route or refuse."""
        pipeline, job = live.pipeline, live.job
        error: BaseException = event.error
        if isinstance(error, DeviceOutOfMemoryError):
            model = str(job.request.model)
            advice = (
                f"Use a quantized variant of {model!r}, a shorter prompt or fewer max_new_tokens, or start a worker "
                "with more memory (a larger GPU type) for it"
            )
            try:
                onward = give_away(
                    error,
                    model=model,
                    hops_done=job.payload.hops_done,
                    next_queue=lambda: rerouting.after_oom(self.task.app, self.runtime, model),
                    advice=advice,
                )
            except CapacityError as refused:
                error = refused
            else:
                pipeline.reroute(job, onward)
                return
        pipeline.fail(job.index, error)

    def _settle(self) -> None:
        """Store what ended (one round trip), write the streams, then tell the parent: stored before acknowledged."""
        for pipeline in self._touched:
            pipeline.flush()
        self._touched = [p for p in self._touched if any(a is None for a in p.answers)]
        for pipeline, index in self._to_answer:
            answer = pipeline.answers[index]
            if answer is None:
                continue
            if wants_stream(pipeline.payloads[index].kwargs):
                entries = stream_end(answer, pipeline.results[index], with_text=answer.id not in self._looped)
                for entry in entries:
                    self.streams.add(answer.id, entry)
        self.streams.flush()
        for pipeline, index in self._to_answer:
            answer = pipeline.answers[index]
            if answer is not None and answer.id not in self.answers:
                self.answers[answer.id] = answer
                if self.channel is not None:
                    self.channel.send(answer.to_wire())
        self._to_answer = []

    # -- housekeeping ---------------------------------------------------------------------------------------

    def _check_soft_limits(self, loop: DecodeLoop) -> None:
        now = time.monotonic()
        late = [key for key, live in self.live.items() if live.soft_deadline is not None and now > live.soft_deadline]
        for key in late:
            cancelled = loop.cancel(key, "soft-time-limit")
            if cancelled is not None:
                self._handle([cancelled])

    def _requeue_waiting(self) -> None:
        """Draining: the jobs the loop has not admitted yet go back to the broker (the parent requeues them)."""
        if self.loop is None:
            return
        for row in list(self.loop.waiting):
            self.loop.cancel(row.key, "requeue")
            live = self.live.pop(row.key, None)
            if live is not None:
                answer = Answer(row.key, "requeue")
                self.answers[row.key] = answer
                if self.channel is not None:
                    self.channel.send(answer.to_wire())

    def _gauges(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if self.loop is None or self.model is None or (not force and now - self._gauges_at < GAUGES_EVERY_S):
            return
        self._gauges_at = now
        self.runtime.generation.gauges(
            self.model,
            running=self.loop.running,
            waiting=len(self.loop.waiting),
            kv_used_bytes=self.loop.kv_bytes,
            kv_reserved_bytes=self.kv_reserved_bytes,
        )
        self.runtime.job_state.request()


def _soft_limit_s(request_dict: dict[str, Any], task: FleetTask[Any]) -> float | None:
    """The job's own soft time limit (``timelimit`` in its message), else its task's."""
    limits = request_dict.get("timelimit") or (None, None)
    soft = limits[1] if isinstance(limits, list | tuple) and len(limits) == 2 else None
    value = soft or task.soft_time_limit
    return float(value) if value else None
