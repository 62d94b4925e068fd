"""Dynamic batching, child side: run a batch of jobs for one model and store each job's own result.

:func:`run_batch` is what the parent's batcher (:mod:`gpufleet.workers.batching`) sends to the pool child. For each job
it does what :class:`gpufleet.workers.task_base.FleetTask` does for a single one: count the delivery, validate the
arguments, map errors to contract errors, add the common result fields, store the result. The compute is shared:

1. every valid job is prepared alone (a bad prompt fails its own job, never the batch);
2. the prepared jobs run as one batch (:mod:`gpufleet.gpu.runtime.batching`);
3. if the batch fails with an out-of-memory or inference error, it is split in halves and each half retried, so
   a failing job ends up failing alone; a single job that runs out of memory goes through the OOM policy (evict,
   retry, re-route to a larger GPU type, or ``CapacityError``) exactly as an unbatched job does.

Each job's result (or failure) is stored before the child returns; the parent then acknowledges each job.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from billiard.einfo import ExceptionInfo
from celery import states
from celery.app.task import Context
from celery.exceptions import Ignore
from celery.utils.saferepr import saferepr
from pydantic import BaseModel

import gpufleet.gpu.errors as gpu_errors
from gpufleet.gpu.runtime.inference import LoadedModel
from gpufleet.tasks import errors
from gpufleet.tasks.contracts import Timings, dump
from gpufleet.workers import state
from gpufleet.workers.oom_policy import run_with_oom_policy
from gpufleet.workers.result_store import StoredState, store_states
from gpufleet.workers.runtime import WorkerRuntime
from gpufleet.workers.task_base import (
    ENQUEUED_AT_HEADER,
    PROGRESS_EVERY_S,
    FleetTask,
    check_deliveries,
    common_result_fields,
    job_errors,
    parse,
)

log = logging.getLogger(__name__)

RequestT = TypeVar("RequestT", bound=BaseModel)
Prepared = TypeVar("Prepared")
Outcome = tuple[bool, Any, float]  # Celery's (failed, result repr or ExceptionInfo, runtime) per job


@dataclass
class BatchJob:
    """One job of a batch, as the parent sends it (picklable: plain data only)."""

    id: str
    args: list[Any]
    kwargs: Any
    request_dict: dict[str, Any]

    @property
    def hops_done(self) -> int:
        return int(self.request_dict.get("replaced_task_nesting", 0) or 0)

    def enqueued_at(self) -> float | None:
        value = self.request_dict.get(ENQUEUED_AT_HEADER)
        if value is None:
            value = (self.request_dict.get("headers") or {}).get(ENQUEUED_AT_HEADER)
        try:
            return float(value) if value is not None else None
        except (TypeError, ValueError):
            return None


def job_payload(request: Any) -> BatchJob:
    """What the child needs of a Celery ``Request`` (runs in the parent)."""
    return BatchJob(request.id, list(request.args), request.kwargs, dict(request.request_dict))


def run_batch(task_name: str, jobs: list[BatchJob]) -> list[Outcome]:
    """Run a batch in the pool child; one outcome per job, in order (the parent acknowledges each)."""
    context = state.context()
    if context is None:  # only a worker started by `gpufleet worker` dispatches batches
        raise RuntimeError("run_batch called outside a gpufleet worker's pool child")
    task = context.app.tasks[task_name]
    if not isinstance(task, BatchedTask):
        raise RuntimeError(f"{task_name} is not a batched task")
    return BatchExecution(task, jobs, state.runtime()).run()


class BatchedTask(FleetTask[RequestT], Generic[RequestT, Prepared]):
    """A fleet task whose jobs for one model can share a forward. Subclasses say how."""

    abstract = True

    def prepare(self, loaded: LoadedModel, request: RequestT) -> Prepared:
        """Per job, before batching (tokenize, check limits); raising fails this job only."""
        raise NotImplementedError

    def compute_batch(self, runtime: WorkerRuntime, loaded: LoadedModel, items: Sequence[Prepared]) -> list[Any]:
        """One output per item, computed together."""
        raise NotImplementedError

    def result_fields(self, request: RequestT, output: Any) -> dict[str, Any]:
        """The task's own result fields for one job's output."""
        raise NotImplementedError


@dataclass
class _Live:
    """A valid job on its way through the batch."""

    index: int
    job: BatchJob
    request: Any
    prepared: Any = None


class BatchExecution:
    """One batch in the child (see the module docstring)."""

    def __init__(self, task: BatchedTask[Any, Any], jobs: list[BatchJob], runtime: WorkerRuntime) -> None:
        self.task = task
        self.jobs = jobs
        self.runtime = runtime
        self.outcomes: list[Outcome | None] = [None] * len(jobs)
        self.started = time.time()
        self.load_s = 0.0
        self.stored: list[StoredState] = []

    def run(self) -> list[Outcome]:
        task, runtime = self.task, self.runtime
        model = next((j.kwargs.get("model") for j in self.jobs if isinstance(j.kwargs, dict)), None)
        runtime.begin_job(self.jobs[0].id, task.name, model if isinstance(model, str) else None)
        self._mark_started()
        live: list[_Live] = []
        for index, job in enumerate(self.jobs):
            try:
                with job_errors(task.name, task.soft_time_limit):
                    check_deliveries(task.app, job.id, job.request_dict.get("delivery_info"), runtime.settings)
                    live.append(_Live(index, job, parse(task.request_model, tuple(job.args), job.kwargs)))
            except Exception as exc:
                self._fail(index, exc)
        if live:
            with runtime.serving():
                self._serve(live)
        # Every job's result is stored before the child returns: the parent acknowledges each job after that.
        store_states(task.backend, self.stored)
        outcomes = [outcome for outcome in self.outcomes if outcome is not None]
        if len(outcomes) != len(self.jobs):  # every path above records one outcome per job
            raise RuntimeError("a batched job got no outcome")
        log.info(
            "%s: batch of %d job(s) for %s in %.3f s", task.name, len(self.jobs), model, time.time() - self.started
        )
        return outcomes

    # -- the shared compute ----------------------------------------------------------------------------------

    def _serve(self, live: list[_Live]) -> None:
        model = str(live[0].request.model)
        try:
            with job_errors(self.task.name, self.task.soft_time_limit):
                progress = self._progress_reporter(live)
                acquired = self._under_oom_policy(
                    live[0].job, model, lambda: self.runtime.acquire(model, progress=progress)
                )
        except Ignore as exc:  # re-routed: every job of the batch goes with it
            for item in live:
                self._reroute_copy(item, exc)
            return
        except Exception as exc:
            for item in live:
                self._fail(item.index, exc)
            return
        self.load_s = acquired.load_s
        ready: list[_Live] = []
        for item in live:
            try:
                with job_errors(self.task.name, self.task.soft_time_limit):
                    item.prepared = self.task.prepare(acquired.loaded, item.request)
                ready.append(item)
            except Exception as exc:
                self._fail(item.index, exc)
        if ready:
            self._compute(model, ready)

    def _compute(self, model: str, items: list[_Live]) -> None:
        """Run ``items`` together; on a device or inference error, split and retry the halves."""
        started = time.perf_counter()
        try:
            if len(items) == 1:
                outputs = self._under_oom_policy(items[0].job, model, lambda: self._forward(model, items))
            else:
                outputs = self._forward(model, items)
        except Ignore as exc:  # a lone job re-routed by the OOM policy
            self._reroute_copy(items[0], exc)
            return
        except (gpu_errors.DeviceOutOfMemoryError, gpu_errors.InferenceError) as exc:
            if len(items) == 1:
                self._fail(items[0].index, exc)
                return
            log.warning("batch of %d failed (%s); retrying it in halves", len(items), type(exc).__name__)
            half = len(items) // 2
            self._compute(model, items[:half])
            self._compute(model, items[half:])
            return
        except Exception as exc:
            for item in items:
                self._fail(item.index, exc)
            return
        compute_s = time.perf_counter() - started
        for item, output in zip(items, outputs, strict=True):
            try:
                fields = self.task.result_fields(item.request, output)
                self._succeed(item, fields, compute_s, batch_size=len(items))
            except Exception as exc:
                self._fail(item.index, exc)

    def _forward(self, model: str, items: list[_Live]) -> list[Any]:
        acquired = self.runtime.acquire(model)  # a hit unless the OOM policy evicted it
        self.runtime.faults.check("infer", model)
        self.runtime.faults.arm("infer", model, acquired.loaded.module)
        return self.task.compute_batch(self.runtime, acquired.loaded, [item.prepared for item in items])

    def _under_oom_policy(self, job: BatchJob, model: str, step: Callable[[], Any]) -> Any:
        from gpufleet.tasks.planning import next_fallback_queue

        runtime = self.runtime

        def reroute(queue: str) -> Any:
            raise Ignore(queue)  # caught by the caller, which re-sends the job(s) to ``queue``

        return run_with_oom_policy(
            step,
            model=model,
            runtime=runtime,
            hops_done=job.hops_done,
            next_queue=lambda: next_fallback_queue(model, runtime.identity.gpu_type, runtime.settings),
            reroute=reroute,
        )

    def _mark_started(self) -> None:
        """State ``STARTED`` for every job, as Celery's own trace stores it (``task_track_started``)."""
        if not self.task.track_started or self.task.ignore_result:
            return
        meta = {"pid": os.getpid(), "hostname": self.runtime.identity.name}
        try:
            started = [StoredState(j.id, states.STARTED, meta, self._context(j)) for j in self.jobs]
            store_states(self.task.backend, started)
        except Exception:  # a progress report: the job itself must not fail for it (its result is retried)
            log.warning("could not store STARTED for a batch of %d", len(self.jobs), exc_info=True)

    def _progress_reporter(self, live: list[_Live]) -> Callable[[int, int], None]:
        """A load's progress as state ``PROGRESS`` on every job waiting for it, at most every 0.25 s."""
        last_report_s = [0.0]

        def report(done_bytes: int, total_bytes: int) -> None:
            now = time.monotonic()
            if now - last_report_s[0] >= PROGRESS_EVERY_S or done_bytes >= total_bytes:
                last_report_s[0] = now
                meta = {"bytes_done": done_bytes, "bytes_total": total_bytes}
                for item in live:
                    self.task.backend.store_result(item.job.id, meta, "PROGRESS", request=self._context(item.job))

        return report

    # -- per-job results -------------------------------------------------------------------------------------

    def _context(self, job: BatchJob) -> Context:
        return Context(job.request_dict, args=job.args, kwargs=job.kwargs, called_directly=False)

    def _succeed(self, item: _Live, fields: dict[str, Any], compute_s: float, *, batch_size: int) -> None:
        enqueued = item.job.enqueued_at()
        timings = Timings(
            queue_wait_s=max(0.0, self.started - enqueued) if enqueued is not None else None,
            load_s=self.load_s,
            compute_s=compute_s,
            total_s=time.time() - self.started,
            batch_size=batch_size,
        )
        common = common_result_fields(self.runtime, str(item.request.model), timings)
        result = dump(self.task.result_model(**fields, **common))
        self.stored.append(StoredState(item.job.id, states.SUCCESS, result, self._context(item.job)))
        self.runtime.end_job(self.task.name, "ok")
        self.outcomes[item.index] = (False, saferepr(result, self.task.resultrepr_maxsize), time.time() - self.started)

    def _fail(self, index: int, exc: BaseException) -> None:
        """Store a contract error for one job (job_errors maps anything else first)."""
        if not isinstance(exc, errors.JobError):
            try:
                with job_errors(self.task.name, self.task.soft_time_limit):
                    raise exc
            except errors.JobError as mapped:
                exc = mapped
        job = self.jobs[index]
        einfo = _exception_info(exc)
        self.stored.append(StoredState(job.id, states.FAILURE, exc, self._context(job), einfo.traceback))
        self.runtime.end_job(self.task.name, type(exc).__name__)
        self.outcomes[index] = (True, einfo, time.time() - self.started)

    def _reroute_copy(self, item: _Live, signal: Ignore) -> None:
        """Re-send one job, same id and arguments, to the queue the OOM policy chose (Celery's replace, per job)."""
        queue = str(signal.args[0]) if signal.args else ""
        headers = {k: v for k, v in item.job.request_dict.items() if k == ENQUEUED_AT_HEADER}
        self.task.app.send_task(
            self.task.name,
            kwargs=item.job.kwargs,
            task_id=item.job.id,
            queue=queue,
            headers=headers,
            replaced_task_nesting=item.job.hops_done + 1,
        )
        self.runtime.end_job(self.task.name, "rerouted")
        self.outcomes[item.index] = (True, _exception_info(Ignore()), time.time() - self.started)


def _exception_info(exc: BaseException) -> ExceptionInfo:
    """Celery's exception info for ``exc`` (what a task's failure carries back to the parent)."""
    try:
        raise exc
    except BaseException:
        return ExceptionInfo()
