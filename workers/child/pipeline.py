"""The one job pipeline: every fleet job, alone or in a batch, goes through the steps here, once.

:func:`run_batch` is what the parent's batcher (:mod:`gpufleet.workers.parent.batching`) asks the pool child to run:
one or more jobs of one task for one model (a job alone is a batch of one). For each job the :class:`Pipeline`

1. counts the delivery (a job whose process keeps dying is failed) and validates its arguments, failing it alone;
2. stores ``STARTED`` and reports a load's progress as ``PROGRESS``;
3. hands the valid jobs to their task's engine (:class:`~gpufleet.workers.child.task_base.EngineKind`): the model is
   acquired once for the batch, under the OOM policy (:mod:`gpufleet.workers.child.oom_policy`: evict, retry,
   re-route, ``CapacityError``); a job from a shared queue whose model the budget cannot hold is forwarded once
   to where the live fleet can (:mod:`gpufleet.workers.child.rerouting`); a re-sent job's state says where it went;
4. maps library errors to contract errors, adds the common result fields (model, worker, device, GPU type,
   timings) and records the job's outcome in the runtime's counters;
5. stores every result (one round trip for the batch, :mod:`gpufleet.workers.child.result_store`) before it
   returns; the parent then acknowledges each job.

The engines say only how outputs are computed: a batched forward that is split in halves when it fails (so a
failing job ends up failing alone), or each job's own ``serve``. The bookkeeping around them does not depend on
which one ran.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from billiard.einfo import ExceptionInfo
from celery import states
from celery.app.task import Context
from celery.exceptions import Ignore
from celery.utils.saferepr import saferepr

import gpufleet.gpu.errors as gpu_errors
from gpufleet.tasks.contracts import REROUTED, Rerouted, Timings, dump
from gpufleet.tasks.errors import CapacityError
from gpufleet.tasks.names import ENQUEUED_AT_HEADER, FORWARDED_HEADER
from gpufleet.workers.child import rerouting, state
from gpufleet.workers.child.job import Job
from gpufleet.workers.child.oom_policy import run_with_oom_policy
from gpufleet.workers.child.rerouting import Onward
from gpufleet.workers.child.result_store import StoredState, store_states
from gpufleet.workers.child.runtime import Acquired, WorkerRuntime
from gpufleet.workers.child.streams import StreamWriter, stream_end, wants_stream
from gpufleet.workers.child.task_base import EngineKind, FleetTask, as_job_error, check_deliveries, parse
from gpufleet.workers.common.context import context as worker_context
from gpufleet.workers.common.jobs import JobPayload, Outcome
from gpufleet.workers.common.session_wire import Answer

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.25
T = TypeVar("T")


def run_batch(task_name: str, payloads: list[JobPayload]) -> list[Outcome]:
    """Run a batch in the pool child; one outcome per job, in order (the parent acknowledges each)."""
    context = worker_context()
    if context is None:  # only a worker started by `gpufleet worker` dispatches batches
        raise RuntimeError("run_batch called outside a gpufleet worker's pool child")
    task = context.app.tasks[task_name]
    if not isinstance(task, FleetTask):
        raise RuntimeError(f"{task_name} is not a fleet task")
    return Pipeline(task, payloads, state.runtime()).run()


class RerouteStep(Exception):
    """The OOM policy chose another queue for the job(s) of the step that raised it."""

    def __init__(self, onward: Onward) -> None:
        super().__init__(onward.queue)
        self.onward = onward


class Pipeline:
    """One batch of jobs in the child (see the module docstring)."""

    def __init__(self, task: FleetTask[Any], payloads: list[JobPayload], runtime: WorkerRuntime) -> None:
        self.task = task
        self.payloads = payloads
        self.runtime = runtime
        self.outcomes: list[Outcome | None] = [None] * len(payloads)
        # The same ends as the parent of a generation session reads them (plain data, no exception objects).
        self.answers: list[Answer | None] = [None] * len(payloads)
        self.results: list[Any] = [None] * len(payloads)  # each successful job's result, as stored
        self.started = time.time()
        self._to_store: list[StoredState] = []

    # -- the steps -----------------------------------------------------------------------------------------

    def run(self) -> list[Outcome]:
        task, runtime = self.task, self.runtime
        model = next((p.model for p in self.payloads if p.model is not None), None)
        runtime.begin_job(self.payloads[0].id, task.name, model)
        jobs = self.admit()
        if jobs:
            with runtime.serving():
                try:
                    ENGINES[task.engine](self, jobs)
                except Exception as exc:  # an engine's own bug: every job still gets an answer
                    log.exception("%s: the %s engine failed", task.name, task.engine.value)
                    for job in jobs:
                        if self.outcomes[job.index] is None:
                            self.fail(job.index, exc)
        # Every job's result is stored before the child returns: the parent acknowledges each job after that.
        self.flush()
        self._end_streams()
        outcomes = [outcome for outcome in self.outcomes if outcome is not None]
        if len(outcomes) != len(self.payloads):  # every path above records one outcome per job
            raise RuntimeError(f"{task.name}: {len(self.payloads) - len(outcomes)} job(s) of the batch got no outcome")
        if len(self.payloads) > 1:
            log.info(
                "%s: batch of %d job(s) for %s in %.3f s",
                task.name,
                len(self.payloads),
                model,
                time.time() - self.started,
            )
        return outcomes

    def admit(self) -> list[Job]:
        """Store ``STARTED``, count each delivery and validate each job; the valid ones (the others are failed)."""
        task = self.task
        self._mark_started()
        jobs: list[Job] = []
        for index, payload in enumerate(self.payloads):
            try:
                check_deliveries(task.app, payload.id, payload.request_dict.get("delivery_info"), self.runtime.settings)
                jobs.append(Job(index, payload, parse(task.request_model, tuple(payload.args), payload.kwargs)))
            except Exception as exc:
                self.fail(index, exc)
        return jobs

    def flush(self) -> None:
        """Store the results recorded so far (one round trip on a Redis backend)."""
        pending, self._to_store = self._to_store, []
        if pending:
            store_states(self.task.backend, pending)

    def _end_streams(self) -> None:
        """Streamed jobs answered here (the static path) get their text and end in their token stream."""
        streamed = [i for i, payload in enumerate(self.payloads) if wants_stream(payload.kwargs)]
        if not streamed:
            return
        writer = StreamWriter(self.task.backend, max_entries=self.runtime.settings.generation.stream_max_entries)
        for index in streamed:
            answer = self.answers[index]
            if answer is not None:
                for entry in stream_end(answer, self.results[index], with_text=True):
                    writer.add(answer.id, entry)
        writer.flush()

    # -- services for the engines --------------------------------------------------------------------------

    def acquire(self, model: str, jobs: list[Job], *, pinned: bool = False) -> Acquired | None:
        """``model`` on the device for ``jobs``, under the OOM policy, reporting a load's progress to each job.

        Counts one cache hit (or miss) per job. Returns None when the jobs are already finished: re-routed by the
        OOM policy, or failed (the model could not be had).
        """
        progress = self._progress_reporter(jobs)
        attempts = [0]

        def step() -> Acquired:
            attempts[0] += 1  # the OOM policy's retry is the same jobs again: count them once
            return self.runtime.acquire(
                model, pinned=pinned, progress=progress, jobs=len(jobs) if attempts[0] == 1 else 0
            )

        try:
            return self.under_oom_policy(jobs[0], model, step)
        except RerouteStep as rerouted:
            for job in jobs:
                self.reroute(job, rerouted.onward)
        except gpu_errors.BudgetExceededError as exc:
            if isinstance(exc, gpu_errors.DeviceOutOfMemoryError):  # never escapes the policy; device work was done
                for job in jobs:
                    self.fail(job.index, exc)
            else:
                self._forward_or_fail(model, jobs, exc)
        except Exception as exc:
            for job in jobs:
                self.fail(job.index, exc)
        return None

    def under_oom_policy(self, job: Job, model: str, step: Callable[[], T]) -> T:
        """Run ``step`` under the OOM policy; a re-route raises :class:`RerouteStep` for the caller to act on."""
        runtime = self.runtime

        def reroute(onward: Onward) -> Any:
            raise RerouteStep(onward)

        return run_with_oom_policy(
            step,
            model=model,
            runtime=runtime,
            hops_done=job.payload.hops_done,
            next_queue=lambda: rerouting.after_oom(self.task.app, runtime, model),
            reroute=reroute,
        )

    def _forward_or_fail(self, model: str, jobs: list[Job], exc: gpu_errors.BudgetExceededError) -> None:
        """The budget cannot hold ``model`` (nothing ran yet): jobs taken from a shared queue go, once, where the
        router sends them without this worker (:func:`gpufleet.workers.child.rerouting.forward`); the rest fail."""
        type_queue = self.runtime.identity.queues[0]
        movable = {job.index for job in jobs if rerouting.may_forward(job.payload, type_queue)}
        onward = rerouting.forward(self.task.app, self.runtime, model) if movable else None
        if onward is not None and onward.queue is not None:
            log.warning("%s; forwarding %d job(s) to %s (%s)", exc, len(movable), onward.queue, onward.reason)
        for job in jobs:
            if onward is None or job.index not in movable:
                self.fail(job.index, exc)
            elif onward.queue is not None:
                self.reroute(job, onward, forward=True)
            else:
                self.fail(
                    job.index,
                    CapacityError(
                        f"{exc}. No other live worker can take the job from the shared queue either: {onward.reason}"
                    ),
                )

    def succeed(
        self, job: Job, fields: dict[str, Any], *, load_s: float = 0.0, compute_s: float = 0.0, batch_size: int = 1
    ) -> None:
        """Record one job's result: its own fields plus, for model jobs, the common ones."""
        task = self.task
        if task.common_fields:
            enqueued = job.payload.enqueued_at()
            timings = Timings(
                queue_wait_s=max(0.0, self.started - enqueued) if enqueued is not None else None,
                load_s=load_s,
                compute_s=compute_s,
                total_s=time.time() - self.started,
                batch_size=batch_size,
            )
            fields = {**fields, **common_result_fields(self.runtime, str(job.request.model), timings)}
        result = dump(task.result_model(**fields))
        self.results[job.index] = result
        self._to_store.append(StoredState(job.id, states.SUCCESS, result, self._context(job.payload)))
        self.runtime.end_job(task.name, "ok")
        runtime_s = time.time() - self.started
        shown = saferepr(result, task.resultrepr_maxsize)
        self.outcomes[job.index] = (False, shown, runtime_s)
        self.answers[job.index] = Answer(job.id, "ok", runtime_s, result_repr=shown)

    def fail(self, index: int, exc: BaseException) -> None:
        """Record a contract error for one job (anything else is mapped to one first)."""
        task = self.task
        exc = as_job_error(task.name, task.soft_time_limit, exc)
        payload = self.payloads[index]
        einfo = exception_info(exc)
        self._to_store.append(StoredState(payload.id, states.FAILURE, exc, self._context(payload), einfo.traceback))
        self.runtime.end_job(task.name, type(exc).__name__)
        runtime_s = time.time() - self.started
        self.outcomes[index] = (True, einfo, runtime_s)
        self.answers[index] = Answer(
            payload.id,
            "error",
            runtime_s,
            error_type=type(exc).__name__,
            error_message=str(exc),
            traceback=einfo.traceback,
        )

    def reroute(self, job: Job, onward: Onward, *, forward: bool = False) -> None:
        """Re-send one job, same id and arguments, to ``onward.queue`` (what Celery's ``Task.replace`` does, per
        job), after storing where it went (state ``REROUTED``), so nobody reads this attempt's progress as current.

        Args:
            job: the job.
            onward: where it goes and why.
            forward: a job this worker's budget cannot hold, forwarded once (marked, so it never loops); else an
                out-of-memory re-route, counted in the job's hops.
        """
        payload = job.payload
        if onward.queue is None:
            raise ValueError(f"job {job.id} has nowhere to go: {onward.reason}")
        headers = {name: payload.header(name) for name in (ENQUEUED_AT_HEADER, FORWARDED_HEADER)}
        worker = self.runtime.identity.name
        if forward:
            headers[FORWARDED_HEADER] = worker
        where = Rerouted(rerouted_to=onward.queue, reason=onward.reason, worker=worker, at=time.time())
        try:
            # Before the re-send: the job's next state, on the worker that takes it, must come after this one.
            store_states(self.task.backend, [StoredState(job.id, REROUTED, dump(where), self._context(payload))])
        except Exception:  # what a watcher is shown; the job itself goes on
            log.warning("could not store where job %s was re-sent", job.id, exc_info=True)
        self.task.app.send_task(
            self.task.name,
            kwargs=payload.kwargs,
            task_id=payload.id,
            queue=onward.queue,
            headers={name: value for name, value in headers.items() if value is not None},
            replaced_task_nesting=payload.hops_done + (0 if forward else 1),
        )
        self.runtime.end_job(self.task.name, "rerouted")
        runtime_s = time.time() - self.started
        self.outcomes[job.index] = (True, exception_info(Ignore()), runtime_s)
        self.answers[job.index] = Answer(job.id, "ignore", runtime_s)

    def revoke(self, index: int, reason: str) -> None:
        """Record a job cancelled while it ran (revoked, or its reader left): stored as ``REVOKED``."""
        from celery.exceptions import TaskRevokedError

        payload = self.payloads[index]
        exc = TaskRevokedError(reason)
        self._to_store.append(StoredState(payload.id, states.REVOKED, exc, self._context(payload)))
        self.runtime.end_job(self.task.name, "revoked")
        runtime_s = time.time() - self.started
        self.outcomes[index] = (True, exception_info(exc), runtime_s)
        self.answers[index] = Answer(payload.id, "revoked", runtime_s, error_message=reason)

    # -- job state -----------------------------------------------------------------------------------------

    def _context(self, payload: JobPayload) -> Context:
        return Context(payload.request_dict, args=payload.args, kwargs=payload.kwargs, called_directly=False)

    def _mark_started(self) -> None:
        """State ``STARTED`` for every job, as Celery's own trace stores it (``task_track_started``)."""
        if not self.task.track_started or self.task.ignore_result:
            return
        meta = {"pid": os.getpid(), "hostname": self.runtime.identity.name}
        try:
            started = [StoredState(p.id, states.STARTED, meta, self._context(p)) for p in self.payloads]
            store_states(self.task.backend, started)
        except Exception:  # a progress report: the job itself must not fail for it (its result is retried)
            log.warning("could not store STARTED for a batch of %d", len(self.payloads), exc_info=True)

    def _progress_reporter(self, jobs: list[Job]) -> Callable[[int, int], None]:
        """A load's progress as state ``PROGRESS`` on every job waiting for it, at most every 0.25 s."""
        last_report_s = [0.0]

        def report(done_bytes: int, total_bytes: int) -> None:
            now = time.monotonic()
            if now - last_report_s[0] >= PROGRESS_EVERY_S or done_bytes >= total_bytes:
                last_report_s[0] = now
                meta = {"bytes_done": done_bytes, "bytes_total": total_bytes}
                entries = [StoredState(j.id, "PROGRESS", meta, self._context(j.payload)) for j in jobs]
                try:
                    store_states(self.task.backend, entries)
                except Exception:  # progress is for people watching; the load goes on
                    log.warning("could not store load progress", exc_info=True)

        return report


def common_result_fields(runtime: WorkerRuntime, model: str, timings: Timings) -> dict[str, Any]:
    """What every model job's result carries besides its own fields: model, worker, device, GPU type, timings."""
    identity = runtime.identity
    return {
        "model": model,
        "worker": identity.name,
        "device": identity.device_label,
        "gpu_type": identity.gpu_type,
        "timings": timings,
    }


def exception_info(exc: BaseException) -> ExceptionInfo:
    """Celery's exception info for ``exc`` (what a failed job's outcome carries back to the parent)."""
    try:
        raise exc
    except BaseException:
        return ExceptionInfo()


# -- the engines -----------------------------------------------------------------------------------------------


def one_by_one(pipeline: Pipeline, jobs: list[Job]) -> None:
    """Each job through its task's own ``serve`` (loads, unloads, diagnostics)."""
    for job in jobs:
        try:
            served = pipeline.task.serve(pipeline, job)
        except Exception as exc:
            pipeline.fail(job.index, exc)
            continue
        if served is not None:
            pipeline.succeed(job, served.fields, load_s=served.load_s, compute_s=served.compute_s)


def batched(pipeline: Pipeline, jobs: list[Job]) -> None:
    """Jobs for one model in one forward: acquire once, prepare each alone, compute together."""
    model = str(jobs[0].request.model)
    acquired = pipeline.acquire(model, jobs)
    if acquired is None:
        return
    ready: list[Job] = []
    for job in jobs:
        try:
            job.prepared = pipeline.task.prepare(acquired.loaded, job.request)
        except Exception as exc:
            pipeline.fail(job.index, exc)
            continue
        ready.append(job)
    if ready:
        compute_prepared(pipeline, acquired, model, ready)


def compute_prepared(pipeline: Pipeline, acquired: Acquired, model: str, jobs: list[Job]) -> None:
    """Run ``jobs`` together; on a device or inference error, split them and retry the halves."""
    runtime, task = pipeline.runtime, pipeline.task

    def forward() -> list[Any]:
        # The same model object unless the OOM policy (here or in an earlier half) evicted it: then get it back,
        # counting no cache hit or miss (these jobs were counted when the batch acquired it).
        loaded = acquired.loaded if runtime.holds(model, acquired.loaded) else runtime.acquire(model, jobs=0).loaded
        runtime.faults.check("infer", model)
        runtime.faults.arm("infer", model, loaded.module)
        return task.compute_batch(runtime, loaded, [job.prepared for job in jobs])

    started = time.perf_counter()
    try:
        outputs = pipeline.under_oom_policy(jobs[0], model, forward) if len(jobs) == 1 else forward()
    except RerouteStep as rerouted:  # a lone job the OOM policy sent elsewhere
        pipeline.reroute(jobs[0], rerouted.onward)
        return
    except (gpu_errors.DeviceOutOfMemoryError, gpu_errors.ForwardError) as exc:
        if len(jobs) == 1:
            pipeline.fail(jobs[0].index, exc)
            return
        log.warning("batch of %d failed (%s); retrying it in halves", len(jobs), type(exc).__name__)
        half = len(jobs) // 2
        compute_prepared(pipeline, acquired, model, jobs[:half])
        compute_prepared(pipeline, acquired, model, jobs[half:])
        return
    except Exception as exc:
        for job in jobs:
            pipeline.fail(job.index, exc)
        return
    compute_s = time.perf_counter() - started
    for job, output in zip(jobs, outputs, strict=True):
        try:
            fields = task.result_fields(job.request, output)
        except Exception as exc:
            pipeline.fail(job.index, exc)
            continue
        pipeline.succeed(job, fields, load_s=acquired.load_s, compute_s=compute_s, batch_size=len(jobs))


ENGINES: dict[EngineKind, Callable[[Pipeline, list[Job]], None]] = {
    EngineKind.BATCHED: batched,
    EngineKind.ONE_BY_ONE: one_by_one,
}
