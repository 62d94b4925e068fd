"""The base class of every fleet task, and the per-job steps the pipeline shares: parsing, delivery counts, errors.

A fleet task says *what* its jobs do; how a job is run is the pipeline's (:mod:`gpufleet.workers.child.pipeline`),
whatever engine computes it. Subclasses set ``name``, ``request_model``, ``result_model`` and an ``engine``:

* :data:`EngineKind.BATCHED` (``fleet.embed``, and ``fleet.generate`` on the static path): jobs for one model share
  a forward; the task implements :meth:`FleetTask.prepare`, :meth:`FleetTask.compute_batch` and
  :meth:`FleetTask.result_fields`;
* :data:`EngineKind.ONE_BY_ONE` (loads, unloads, diagnostics): each job alone, through :meth:`FleetTask.serve`.

Every job of every task reaches the pool child through the parent's batcher (a job alone is a batch of one) and
runs in :func:`gpufleet.workers.child.pipeline.run_batch`; Celery's own ``Task.run`` is never the path.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded, TaskPredicate
from pydantic import BaseModel

import gpufleet.gpu.errors as gpu_errors
from gpufleet.tasks import errors
from gpufleet.tasks.contracts import validate_request

if TYPE_CHECKING:
    from gpufleet.gpu.runtime.model import LoadedModel
    from gpufleet.tasks.settings import Settings
    from gpufleet.workers.child.job import Job, JobServices
    from gpufleet.workers.child.runtime import WorkerRuntime

log = logging.getLogger(__name__)

RequestT = TypeVar("RequestT", bound=BaseModel)


class EngineKind(str, enum.Enum):
    """How the pipeline computes a task's jobs (see the module docstring)."""

    BATCHED = "batched"
    ONE_BY_ONE = "one-by-one"


def parse(model: type[RequestT], args: tuple[Any, ...], kwargs: Any) -> RequestT:
    """Validate a job's arguments against its contract (keyword arguments only).

    Raises:
        InvalidRequestError: positional arguments, kwargs that are not a mapping, or naming every wrong field.
    """
    if args:
        raise errors.InvalidRequestError(
            f"{model.__name__} takes keyword arguments only; got {len(args)} positional argument(s): "
            "send kwargs={...} with send_task"
        )
    if not isinstance(kwargs, dict):
        raise errors.InvalidRequestError(
            f"{model.__name__} takes keyword arguments as a mapping; got {type(kwargs).__name__}"
        )
    return validate_request(model, kwargs)


_GPU_TO_JOB: tuple[tuple[type[Exception], type[errors.JobError]], ...] = (
    (gpu_errors.UnsafeModelIdError, errors.InvalidRequestError),
    (gpu_errors.ModelNotInstalledError, errors.ModelNotFoundError),
    (gpu_errors.LoadFailedError, errors.ModelLoadError),
    (gpu_errors.BudgetExceededError, errors.CapacityError),
    (gpu_errors.ForwardError, errors.InferenceError),
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
            f"{task_name} exceeded its soft time limit of {soft_limit_s or 0:g} s and was stopped; raise "
            "GPUFLEET_JOBS__SOFT_TIME_LIMIT_S or send a smaller job"
        ) from None
    except gpu_errors.GpuError as exc:
        for source, target in _GPU_TO_JOB:
            if isinstance(exc, source):
                raise target(str(exc)) from None
        raise
    except TaskPredicate:
        raise  # Celery's own control flow (Ignore, Retry), not a failure
    except Exception as exc:
        # Anything else (a library's own exception type) still reaches the caller as a contract error; the
        # traceback stays in the worker log, where it is useful.
        log.exception("%s failed with an unexpected %s", task_name, type(exc).__name__)
        raise errors.JobError(
            f"{task_name} failed unexpectedly: {type(exc).__name__}: {exc}; the worker keeps serving. If it repeats, "
            "the worker log has the traceback: please report it"
        ) from None


def as_job_error(task_name: str, soft_limit_s: float | None, exc: BaseException) -> BaseException:
    """``exc`` as the contract error :func:`job_errors` makes of it (Celery's control flow passes unchanged)."""
    if isinstance(exc, errors.JobError):
        return exc
    try:
        with job_errors(task_name, soft_limit_s):
            raise exc
    except BaseException as mapped:
        return mapped
    return exc  # pragma: no cover - job_errors always raises


def check_deliveries(app: Any, job_id: str, delivery_info: dict[str, Any] | None, settings: Settings) -> None:
    """Count this delivery of ``job_id``; fail the job once it was delivered over ``jobs.max_deliveries`` times.

    ``task_reject_on_worker_lost`` requeues a job whose process died; Redis does not count deliveries, so the
    count lives in the result backend's Redis (when it is one) under the job id. Only redeliveries (the broker's
    ``redelivered`` flag) are counted there: a first delivery costs no round trip
    (:func:`gpufleet.workers.child.job_accounting.count_delivery`).

    Raises:
        JobError: the job keeps killing its worker process.
    """
    from gpufleet.workers.child import job_accounting

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


@dataclass
class Served:
    """What a one-by-one task body returns: its own result fields, and where its time went."""

    fields: dict[str, Any]
    load_s: float = 0.0
    compute_s: float = 0.0


class FleetTask(Task, Generic[RequestT]):  # type: ignore[misc]
    """A fleet job: JSON in, JSON out, contract errors only. See the module docstring."""

    abstract = True
    request_model: ClassVar[type[BaseModel]]
    result_model: ClassVar[type[BaseModel]]
    engine: ClassVar[EngineKind] = EngineKind.ONE_BY_ONE
    # Results of model jobs carry model, worker, device, GPU type and timings; a diagnostic task's do not.
    common_fields: ClassVar[bool] = True
    # Read by the parent's batcher (duck-typed: it never imports this module): jobs per batch, set at registration.
    fleet_batch_size: int = 1
    # Read by the parent's batcher too: the jobs run in a generation session (a decode loop they join and leave).
    fleet_continuous: bool = False

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Not a path: a fleet job runs in the worker's pipeline, reached through its consumer."""
        raise errors.JobError(
            f"{self.name} runs only inside a `gpufleet worker`, whose consumer hands every job to the pipeline; "
            "send it with send_task (or FleetClient) instead of calling the task"
        )

    # -- one-by-one tasks --------------------------------------------------------------------------------

    def serve(self, pipeline: JobServices, job: Job) -> Served | None:
        """One job's own work (one-by-one tasks). None when the pipeline already finished the job (re-routed)."""
        raise NotImplementedError

    # -- batched tasks -----------------------------------------------------------------------------------

    def prepare(self, loaded: LoadedModel, request: RequestT) -> Any:
        """Per job, before batching (tokenize, check limits); raising fails this job only."""
        raise NotImplementedError

    def compute_batch(self, runtime: WorkerRuntime, loaded: LoadedModel, items: Sequence[Any]) -> list[Any]:
        """One output per prepared item, computed together."""
        raise NotImplementedError

    def result_fields(self, request: RequestT, output: Any) -> dict[str, Any]:
        """The task's own result fields for one job's output."""
        raise NotImplementedError
