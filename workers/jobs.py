"""Task bodies: parse the JSON request, get the model, run it, map errors. Thin by design.

Every job validates its request against ``tasks.contracts`` (unknown or positional arguments are refused), and
every failure comes back as a ``tasks.errors.JobError`` naming what was wrong and what to do; the worker keeps
serving. A device out-of-memory error evicts unpinned models and retries once, then re-sends the job to the next
fallback GPU type of its plan (at most ``MAX_OOM_HOPS`` times).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded
from pydantic import BaseModel

import gpu.errors as gpu_errors
from gpu.runtime.inference import LoadedModel, embed, generate
from tasks import errors
from tasks.contracts import (
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    GenerateResult,
    LoadModelRequest,
    LoadModelResult,
    SleepRequest,
    SleepResult,
    Timings,
    UnloadModelRequest,
    UnloadModelResult,
    dump,
    validate_request,
)
from tasks.names import TaskName
from tasks.settings import Settings
from workers import process
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)

MAX_OOM_HOPS = 2
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
def job_errors(task_name: str, limit_s: float | None) -> Iterator[None]:
    """Translate library errors into contract errors, once, at the task boundary."""
    try:
        yield
    except errors.JobError:
        raise
    except SoftTimeLimitExceeded:
        raise errors.JobError(
            f"{task_name} exceeded its soft time limit of {limit_s:g} s and was stopped; raise "
            "GPUFLEET_JOBS__SOFT_TIME_LIMIT_S or send a smaller job"
        ) from None
    except gpu_errors.GpuError as exc:
        for source, target in _GPU_TO_JOB:
            if isinstance(exc, source):
                raise target(str(exc)) from None
        raise


def _queue_wait_s(task: Task, started: float) -> float | None:
    enqueued = getattr(task.request, ENQUEUED_AT_HEADER, None)
    if enqueued is None:
        enqueued = (task.request.headers or {}).get(ENQUEUED_AT_HEADER) if task.request.headers else None
    try:
        return max(0.0, started - float(enqueued)) if enqueued is not None else None
    except (TypeError, ValueError):
        return None


def _finish(
    task: Task, runtime: WorkerRuntime, model: str, started: float, *, load_s: float = 0.0, compute_s: float = 0.0
) -> dict[str, Any]:
    """Count the job and return the fields every result carries (model, worker, device, timings)."""
    runtime.job_done()
    timings = Timings(
        queue_wait_s=_queue_wait_s(task, started), load_s=load_s, compute_s=compute_s, total_s=time.time() - started
    )
    return {
        "model": model,
        "worker": runtime.identity.name,
        "device": runtime.identity.device_label,
        "gpu_type": runtime.identity.gpu_type,
        "timings": timings,
    }


def _progress_reporter(task: Task) -> Callable[[int, int], None]:
    """Publish a load's progress as Celery state ``PROGRESS`` (bytes done/total), at most every 0.25 s."""
    last_report_s = [0.0]

    def report(done_bytes: int, total_bytes: int) -> None:
        now = time.monotonic()
        if now - last_report_s[0] >= PROGRESS_EVERY_S or done_bytes >= total_bytes:
            last_report_s[0] = now
            task.update_state(state="PROGRESS", meta={"bytes_done": done_bytes, "bytes_total": total_bytes})

    return report


def _infer(
    task: Task, runtime: WorkerRuntime, model: str, compute: Callable[[LoadedModel], T]
) -> tuple[T, float, float]:
    """Get the model (reporting load progress) and run ``compute`` on it, with the OOM path.

    Returns:
        (output, load_s, compute_s).
    """
    progress = _progress_reporter(task)

    def run() -> tuple[T, float, float]:
        acquired = runtime.acquire(model, progress=progress)
        runtime.faults.check("infer", model)
        compute_started = time.perf_counter()
        output = compute(acquired.loaded)
        return output, acquired.load_s, time.perf_counter() - compute_started

    return _with_oom_recovery(task, runtime, model, run)


def _count_delivery(task: Task, settings: Settings) -> None:
    """Fail a job that keeps killing its worker process instead of redelivering it forever.

    ``task_reject_on_worker_lost`` requeues a job whose process died; Redis does not count deliveries, so the
    count lives in the result backend's Redis (when it is one) under the job id.
    """
    client = getattr(task.app.backend, "client", None)
    if client is None or not task.request.id:
        return
    key = f"gpufleet:deliveries:{task.request.id}"
    try:
        count = int(client.incr(key))
        client.expire(key, settings.broker.visibility_timeout_s * 2)
    except Exception:  # counting is a safety net; a backend hiccup must not fail the job
        log.warning("could not count deliveries of %s", task.request.id, exc_info=True)
        return
    if count > settings.jobs.max_deliveries:
        raise errors.JobError(
            f"job {task.request.id} was delivered {count} times and its worker process died each time "
            f"(over GPUFLEET_JOBS__MAX_DELIVERIES={settings.jobs.max_deliveries}); not retrying it. "
            "Check the worker logs for the crash"
        )


def _reroute_after_oom(task: Task, runtime: WorkerRuntime, model: str, exc: Exception) -> Any:
    """Re-send the job to the next GPU type of the model's plan, or fail with a clear capacity error."""
    from tasks.routing import next_fallback_queue

    hops = int(task.request.get("replaced_task_nesting", 0) or 0)
    queue = next_fallback_queue(model, runtime.identity.gpu_type) if hops < MAX_OOM_HOPS else None
    if queue is None:
        raise errors.CapacityError(
            f"{exc}; evicting unpinned models and retrying did not help, and no larger GPU type is left to "
            f"try after {hops} re-route(s). Use a quantized variant of {model!r} or a bigger GPU"
        ) from None
    log.warning("out of memory for %s on %s; re-sending to %s", model, runtime.identity.name, queue)
    signature = task.signature(kwargs=task.request.kwargs, queue=queue, headers=task.request.headers)
    raise task.replace(signature)


def _with_oom_recovery(task: Task, runtime: WorkerRuntime, model: str, body: Callable[[], T]) -> T:
    try:
        return body()
    except gpu_errors.DeviceOutOfMemoryError:
        log.warning("out of memory running %s; evicting unpinned models and retrying once", model)
        runtime.relieve_memory()
    try:
        return body()
    except gpu_errors.DeviceOutOfMemoryError as exc:
        return _reroute_after_oom(task, runtime, model, exc)  # type: ignore[no-any-return]


TaskBody = Callable[..., dict[str, Any]]


def _register(app: Celery, name: TaskName, **options: Any) -> Callable[[TaskBody], TaskBody]:
    """``@app.task(bind=True)`` with a type mypy can see (Celery's decorator is untyped)."""

    def decorator(body: TaskBody) -> TaskBody:
        app.task(name=name.value, bind=True, **options)(body)
        return body

    return decorator


def register_tasks(app: Celery, settings: Settings) -> None:
    """Register the fleet's task bodies on ``app`` (worker side only)."""
    limits = settings.jobs
    infer = {"soft_time_limit": limits.soft_time_limit_s, "time_limit": limits.time_limit_s}
    load = {"soft_time_limit": limits.load_soft_time_limit_s, "time_limit": limits.load_time_limit_s}

    @_register(app, TaskName.EMBED, **infer)
    def embed_task(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
        started = time.time()
        runtime = process.runtime()
        with job_errors(self.name, limits.soft_time_limit_s):
            _count_delivery(self, settings)
            request = parse(EmbedRequest, args, kwargs)
            vectors, load_s, compute_s = _infer(
                self, runtime, request.model, lambda loaded: embed(loaded, request.texts, normalize=request.normalize)
            )
        common = _finish(self, runtime, request.model, started, load_s=load_s, compute_s=compute_s)
        return dump(EmbedResult(embeddings=vectors, dim=len(vectors[0]), normalized=request.normalize, **common))

    @_register(app, TaskName.GENERATE, **infer)
    def generate_task(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
        started = time.time()
        runtime = process.runtime()
        with job_errors(self.name, limits.soft_time_limit_s):
            _count_delivery(self, settings)
            request = parse(GenerateRequest, args, kwargs)
            messages = None if request.messages is None else [m.model_dump() for m in request.messages]
            output, load_s, compute_s = _infer(
                self,
                runtime,
                request.model,
                lambda loaded: generate(
                    loaded,
                    prompt=request.prompt,
                    messages=messages,
                    max_new_tokens=request.max_new_tokens,
                    temperature=float(request.temperature),
                    top_p=float(request.top_p),
                    seed=request.seed,
                ),
            )
        common = _finish(self, runtime, request.model, started, load_s=load_s, compute_s=compute_s)
        result = GenerateResult(
            text=output.text,
            prompt_tokens=output.prompt_tokens,
            completion_tokens=output.completion_tokens,
            finish_reason=output.finish_reason,  # type: ignore[arg-type]
            **common,
        )
        return dump(result)

    @_register(app, TaskName.LOAD_MODEL, **load)
    def load_model_task(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
        started = time.time()
        runtime = process.runtime()
        with job_errors(self.name, limits.load_soft_time_limit_s):
            _count_delivery(self, settings)
            request = parse(LoadModelRequest, args, kwargs)
            acquired = _with_oom_recovery(
                self,
                runtime,
                request.model,
                lambda: runtime.acquire(request.model, pinned=request.priority, progress=_progress_reporter(self)),
            )
        action = {"hit": "already-loaded", "loaded": "loaded", "restored": "restored"}[acquired.action]
        common = _finish(self, runtime, request.model, started, load_s=acquired.load_s)
        result = LoadModelResult(
            action=action,  # type: ignore[arg-type]
            bytes=acquired.loaded.bytes,
            seconds=acquired.load_s,
            pinned=request.priority,
            loader=acquired.loaded.loader,
            evicted=list(acquired.evicted),
            **common,
        )
        return dump(result)

    @_register(app, TaskName.UNLOAD_MODEL, **infer)
    def unload_model_task(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
        started = time.time()
        runtime = process.runtime()
        with job_errors(self.name, limits.soft_time_limit_s):
            request = parse(UnloadModelRequest, args, kwargs)
            freed = runtime.unload(request.model)
        common = _finish(self, runtime, request.model, started)
        result = UnloadModelResult(
            action="not-loaded" if freed is None else "unloaded",
            bytes=freed or 0,
            seconds=common["timings"].total_s,
            **common,
        )
        return dump(result)

    @_register(app, TaskName.SLEEP, **infer)
    def sleep_task(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
        runtime = process.runtime()
        with job_errors(self.name, limits.soft_time_limit_s):
            request = parse(SleepRequest, args, kwargs)
            started = time.perf_counter()
            deadline = started + float(request.seconds)
            while (left := deadline - time.perf_counter()) > 0:
                try:
                    time.sleep(left)
                except SoftTimeLimitExceeded:
                    if not request.uninterruptible:
                        raise
        return dump(SleepResult(worker=runtime.identity.name, slept_s=time.perf_counter() - started))
