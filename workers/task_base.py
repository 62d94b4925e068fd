"""The base class of every fleet task: the prologue and epilogue each job shares, so task bodies stay a few lines.

:meth:`FleetTask.run` is what Celery calls. It

1. counts the delivery (a job whose process keeps dying is failed after ``GPUFLEET_JOBS__MAX_DELIVERIES``);
2. validates the keyword arguments against the task's request model (positional arguments are refused);
3. holds the runtime's serving lock (idle expiry never evicts under a running job) and calls :meth:`serve`;
4. maps library errors to contract errors (:func:`job_errors`), once, here;
5. adds what every result carries (model, worker, device, GPU type, timings) and returns JSON.

Subclasses set ``name``, ``request_model`` and ``result_model`` and implement :meth:`serve`; device work goes
through :meth:`FleetTask.infer` or :meth:`FleetTask.acquire`, which apply the OOM policy
(:mod:`gpufleet.workers.oom_policy`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from celery import Task
from celery.exceptions import Ignore, SoftTimeLimitExceeded, TaskPredicate
from pydantic import BaseModel

import gpufleet.gpu.errors as gpu_errors
from gpufleet.gpu.runtime.inference import LoadedModel
from gpufleet.tasks import errors
from gpufleet.tasks.contracts import Timings, dump, validate_request
from gpufleet.workers import state
from gpufleet.workers.oom_policy import run_with_oom_policy
from gpufleet.workers.runtime import Acquired, WorkerRuntime

log = logging.getLogger(__name__)

ENQUEUED_AT_HEADER = "fleet_enqueued_at"
PROGRESS_EVERY_S = 0.25
RequestT = TypeVar("RequestT", bound=BaseModel)
T = TypeVar("T")


def parse(model: type[RequestT], args: tuple[Any, ...], kwargs: dict[str, Any]) -> RequestT:
    """Validate a job's arguments against its contract (keyword arguments only).

    Raises:
        InvalidRequestError: positional arguments, or naming every field that is wrong.
    """
    if args:
        raise errors.InvalidRequestError(
            f"{model.__name__} takes keyword arguments only; got {len(args)} positional argument(s): "
            "send kwargs={...} with send_task"
        )
    return validate_request(model, kwargs)


_GPU_TO_JOB: tuple[tuple[type[Exception], type[errors.JobError]], ...] = (
    (gpu_errors.UnsafeModelIdError, errors.InvalidRequestError),
    (gpu_errors.ModelNotFoundError, errors.ModelNotFoundError),
    (gpu_errors.ModelLoadError, errors.ModelLoadError),
    (gpu_errors.CapacityError, errors.CapacityError),
    (gpu_errors.InferenceError, errors.InferenceError),
    (gpu_errors.GpuError, errors.JobError),
)


@contextmanager
def job_errors(task_name: str, soft_limit_s: float | None) -> Iterator[None]:
    """Translate library errors into contract errors, once, at the task boundary."""
    try:
        yield
    except errors.JobError:
        raise
    except SoftTimeLimitExceeded:
        raise errors.JobError(
            f"{task_name} exceeded its soft time limit of {soft_limit_s:g} s and was stopped; raise "
            "GPUFLEET_JOBS__SOFT_TIME_LIMIT_S or send a smaller job"
        ) from None
    except gpu_errors.GpuError as exc:
        for source, target in _GPU_TO_JOB:
            if isinstance(exc, source):
                raise target(str(exc)) from None
        raise
    except TaskPredicate:
        raise  # Celery's own control flow (a re-route's replace, a retry), not a failure
    except Exception as exc:
        # Anything else (a library's own exception type) still reaches the caller as a contract error; the
        # traceback stays in the worker log, where it is useful.
        log.exception("%s failed with an unexpected %s", task_name, type(exc).__name__)
        raise errors.JobError(
            f"{task_name} failed unexpectedly: {type(exc).__name__}: {exc}; the worker keeps serving. If it repeats, "
            "the worker log has the traceback: please report it"
        ) from None


def check_deliveries(app: Any, job_id: str, delivery_info: dict[str, Any] | None, settings: Any) -> None:
    """Count this delivery of ``job_id``; fail the job once it was delivered over ``jobs.max_deliveries`` times.

    ``task_reject_on_worker_lost`` requeues a job whose process died; Redis does not count deliveries, so the
    count lives in the result backend's Redis (when it is one) under the job id. Only redeliveries (the broker's
    ``redelivered`` flag) are counted there: a first delivery costs no round trip
    (:func:`gpufleet.workers.job_accounting.count_delivery`). Used by single jobs and by each job of a batch.

    Raises:
        JobError: the job keeps killing its worker process.
    """
    from gpufleet.workers import job_accounting

    client = getattr(app.backend, "client", None)
    if client is None:
        return
    redelivered = bool((delivery_info or {}).get("redelivered", False))
    try:
        count, too_many = job_accounting.count_delivery(
            client,
            job_id,
            redelivered=redelivered,
            ttl_s=settings.broker.visibility_timeout_s * 2,
            max_deliveries=settings.jobs.max_deliveries,
        )
    except Exception:  # counting is a safety net; a backend hiccup must not fail the job
        log.warning("could not count deliveries of %s", job_id, exc_info=True)
        return
    if too_many:
        raise errors.JobError(
            f"job {job_id} was delivered {count} times and its worker process died each time "
            f"(over GPUFLEET_JOBS__MAX_DELIVERIES={settings.jobs.max_deliveries}); not retrying it. "
            "Check the worker logs for the crash"
        )


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


@dataclass
class Served:
    """What a task body returns: its own result fields, and where its time went."""

    fields: dict[str, Any]
    load_s: float = 0.0
    compute_s: float = 0.0


class FleetTask(Task, Generic[RequestT]):  # type: ignore[misc]
    """A fleet job: JSON in, JSON out, contract errors only. See the module docstring for what it adds."""

    abstract = True
    request_model: ClassVar[type[BaseModel]]
    result_model: ClassVar[type[BaseModel]]
    # Results of model jobs carry model, worker, device, GPU type and timings; a diagnostic task may not.
    common_fields: ClassVar[bool] = True

    def run(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        started = time.time()
        runtime = state.runtime()
        model_arg = kwargs.get("model")
        runtime.begin_job(str(self.request.id or ""), self.name, model_arg if isinstance(model_arg, str) else None)
        outcome = "ok"
        try:
            with job_errors(self.name, self.soft_time_limit):
                self._count_delivery(runtime)
                request: RequestT = parse(self.request_model, args, kwargs)  # type: ignore[assignment]
                with runtime.serving():
                    served = self.serve(runtime, request)
        except Ignore:  # Celery's replace(): the OOM policy re-sent the job to a bigger GPU type
            outcome = "rerouted"
            raise
        except BaseException as exc:
            outcome = type(exc).__name__  # the contract error's class name, as the caller receives it
            raise
        finally:
            runtime.end_job(self.name, outcome)
        if not self.common_fields:
            return dump(self.result_model(**served.fields))
        model = str(getattr(request, "model", ""))
        timings = Timings(
            queue_wait_s=self._queue_wait_s(started),
            load_s=served.load_s,
            compute_s=served.compute_s,
            total_s=time.time() - started,
        )
        return dump(self.result_model(**served.fields, **common_result_fields(runtime, model, timings)))

    def serve(self, runtime: WorkerRuntime, request: RequestT) -> Served:
        """The task's own work. Raise gpu or contract errors; they reach the caller as contract errors."""
        raise NotImplementedError

    # -- helpers for task bodies -------------------------------------------------------------------------

    def acquire(self, runtime: WorkerRuntime, model: str, *, pinned: bool = False) -> Acquired:
        """Get ``model`` onto the device (reporting load progress), under the OOM policy."""
        progress = self._progress_reporter()
        return self._under_oom_policy(runtime, model, lambda: runtime.acquire(model, pinned=pinned, progress=progress))

    def infer(self, runtime: WorkerRuntime, model: str, compute: Callable[[LoadedModel], T]) -> Served:
        """Get ``model`` and run ``compute`` on it, both under the OOM policy.

        Returns:
            ``fields`` holds the compute's output under ``"output"``; the load and compute seconds.
        """
        progress = self._progress_reporter()

        def step() -> Served:
            acquired = runtime.acquire(model, progress=progress)
            runtime.faults.check("infer", model)
            runtime.faults.arm("infer", model, acquired.loaded.module)
            compute_started = time.perf_counter()
            output = compute(acquired.loaded)
            return Served({"output": output}, acquired.load_s, time.perf_counter() - compute_started)

        return self._under_oom_policy(runtime, model, step)

    def _under_oom_policy(self, runtime: WorkerRuntime, model: str, step: Callable[[], T]) -> T:
        return run_with_oom_policy(
            step,
            model=model,
            runtime=runtime,
            hops_done=int(self.request.get("replaced_task_nesting", 0) or 0),
            next_queue=lambda: self._next_queue(model, runtime),
            reroute=self._reroute,
        )

    @staticmethod
    def _next_queue(model: str, runtime: WorkerRuntime) -> str | None:
        from gpufleet.tasks.planning import next_fallback_queue

        return next_fallback_queue(model, runtime.identity.gpu_type, runtime.settings)

    def _reroute(self, queue: str) -> Any:
        """Re-send this job, same id and arguments, to ``queue`` (Celery's replace raises to end this run)."""
        signature = self.signature(kwargs=self.request.kwargs, queue=queue, headers=self.request.headers)
        raise self.replace(signature)

    def _progress_reporter(self) -> Callable[[int, int], None]:
        """Publish a load's progress as Celery state ``PROGRESS`` (bytes done/total), at most every 0.25 s."""
        last_report_s = [0.0]

        def report(done_bytes: int, total_bytes: int) -> None:
            now = time.monotonic()
            if now - last_report_s[0] >= PROGRESS_EVERY_S or done_bytes >= total_bytes:
                last_report_s[0] = now
                self.update_state(state="PROGRESS", meta={"bytes_done": done_bytes, "bytes_total": total_bytes})

        return report

    def _queue_wait_s(self, started: float) -> float | None:
        enqueued = getattr(self.request, ENQUEUED_AT_HEADER, None)
        if enqueued is None and self.request.headers:
            enqueued = self.request.headers.get(ENQUEUED_AT_HEADER)
        try:
            return max(0.0, started - float(enqueued)) if enqueued is not None else None
        except (TypeError, ValueError):
            return None

    def _count_delivery(self, runtime: WorkerRuntime) -> None:
        """Fail a job that keeps killing its worker process instead of redelivering it forever."""
        if self.request.id:
            check_deliveries(self.app, self.request.id, self.request.delivery_info, runtime.settings)
