"""The fleet's task bodies: each says what its job does; :class:`gpufleet.workers.task_base.FleetTask` does the rest.

Parsing, delivery counting, error mapping, timings and the OOM policy are the base class's. The diagnostic
tasks ``fleet.diag.sleep`` and ``fleet.diag.noop`` (a bare Celery task) answer only on a worker started with
``GPUFLEET_DIAGNOSTICS=true``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from gpufleet.gpu.runtime.batching import (
    EmbedJob,
    EncodedPrompt,
    GenerateJob,
    embed_batch,
    encode_prompt,
    generate_batch,
)
from gpufleet.gpu.runtime.inference import Generation, LoadedModel, embed, generate
from gpufleet.tasks import errors
from gpufleet.tasks.contracts import (
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    GenerateResult,
    LoadModelRequest,
    LoadModelResult,
    SleepRequest,
    SleepResult,
    UnloadModelRequest,
    UnloadModelResult,
)
from gpufleet.tasks.names import TaskName
from gpufleet.tasks.settings import Settings
from gpufleet.workers.batch_exec import BatchedTask
from gpufleet.workers.runtime import WorkerRuntime
from gpufleet.workers.task_base import FleetTask, Served

LOAD_ACTIONS = {"hit": "already-loaded", "loaded": "loaded", "restored": "restored"}


class EmbedTask(BatchedTask[EmbedRequest, EmbedJob]):
    name = TaskName.EMBED.value
    request_model = EmbedRequest
    result_model = EmbedResult

    def serve(self, runtime: WorkerRuntime, request: EmbedRequest) -> Served:
        if runtime.settings.batching.enabled:  # the batched path, as a batch of one (same numerics)
            job = EmbedJob(request.texts, request.normalize)
            served = self.infer(runtime, request.model, lambda m: self.compute_batch(runtime, m, [job])[0])
        else:
            served = self.infer(runtime, request.model, lambda m: embed(m, request.texts, normalize=request.normalize))
        served.fields = self.result_fields(request, served.fields.pop("output"))
        return served

    def prepare(self, loaded: LoadedModel, request: EmbedRequest) -> EmbedJob:
        return EmbedJob(request.texts, request.normalize)

    def compute_batch(self, runtime: WorkerRuntime, loaded: LoadedModel, items: Sequence[EmbedJob]) -> list[Any]:
        return embed_batch(loaded, items, max_batch_tokens=runtime.settings.batching.max_batch_tokens)

    def result_fields(self, request: EmbedRequest, output: Any) -> dict[str, Any]:
        return {"embeddings": output, "dim": len(output[0]), "normalized": request.normalize}


class GenerateTask(BatchedTask[GenerateRequest, EncodedPrompt]):
    name = TaskName.GENERATE.value
    request_model = GenerateRequest
    result_model = GenerateResult

    def serve(self, runtime: WorkerRuntime, request: GenerateRequest) -> Served:
        if runtime.settings.batching.enabled:  # the batched path, as a batch of one (same sampler, same seeds)
            served = self.infer(
                runtime, request.model, lambda m: self.compute_batch(runtime, m, [self.prepare(m, request)])[0]
            )
        else:
            served = self.infer(runtime, request.model, lambda m: generate(m, **_generate_options(request)))
        served.fields = self.result_fields(request, served.fields.pop("output"))
        return served

    def prepare(self, loaded: LoadedModel, request: GenerateRequest) -> EncodedPrompt:
        return encode_prompt(loaded, GenerateJob(**_generate_options(request)))

    def compute_batch(self, runtime: WorkerRuntime, loaded: LoadedModel, items: Sequence[EncodedPrompt]) -> list[Any]:
        return generate_batch(loaded, items)

    def result_fields(self, request: GenerateRequest, output: Generation) -> dict[str, Any]:
        return {
            "text": output.text,
            "prompt_tokens": output.prompt_tokens,
            "completion_tokens": output.completion_tokens,
            "finish_reason": output.finish_reason,
        }


def _generate_options(request: GenerateRequest) -> dict[str, Any]:
    return {
        "prompt": request.prompt,
        "messages": None if request.messages is None else [m.model_dump() for m in request.messages],
        "max_new_tokens": request.max_new_tokens,
        "temperature": float(request.temperature),
        "top_p": float(request.top_p),
        "seed": request.seed,
    }


class LoadModelTask(FleetTask[LoadModelRequest]):
    name = TaskName.LOAD_MODEL.value
    request_model = LoadModelRequest
    result_model = LoadModelResult

    def serve(self, runtime: WorkerRuntime, request: LoadModelRequest) -> Served:
        acquired = self.acquire(runtime, request.model, pinned=request.priority)
        fields = {
            "action": LOAD_ACTIONS[acquired.action],
            "bytes": acquired.loaded.bytes,
            "seconds": acquired.load_s,
            "pinned": request.priority,
            "loader": acquired.loaded.loader,
            "evicted": list(acquired.evicted),
        }
        return Served(fields, load_s=acquired.load_s)


class UnloadModelTask(FleetTask[UnloadModelRequest]):
    name = TaskName.UNLOAD_MODEL.value
    request_model = UnloadModelRequest
    result_model = UnloadModelResult

    def serve(self, runtime: WorkerRuntime, request: UnloadModelRequest) -> Served:
        started = time.perf_counter()
        freed = runtime.unload(request.model)
        fields = {
            "action": "not-loaded" if freed is None else "unloaded",
            "bytes": freed or 0,
            "seconds": time.perf_counter() - started,
        }
        return Served(fields)


class SleepTask(FleetTask[SleepRequest]):
    """Holds the worker's process: for checking liveness, limits and control while busy (diagnostics only)."""

    name = TaskName.SLEEP.value
    request_model = SleepRequest
    result_model = SleepResult
    common_fields = False

    def serve(self, runtime: WorkerRuntime, request: SleepRequest) -> Served:
        if not runtime.settings.diagnostics:
            raise errors.InvalidRequestError(
                f"{self.name} is a diagnostic task and diagnostics are off on {runtime.identity.name}; start the "
                "worker with GPUFLEET_DIAGNOSTICS=true to use it (test fleets only)"
            )
        started = time.perf_counter()
        deadline = started + float(request.seconds)
        while (left := deadline - time.perf_counter()) > 0:
            try:
                time.sleep(left)
            except SoftTimeLimitExceeded:
                if not request.uninterruptible:
                    raise
        return Served({"worker": runtime.identity.name, "slept_s": time.perf_counter() - started})


TASKS: tuple[type[FleetTask[Any]], ...] = (EmbedTask, GenerateTask, LoadModelTask, UnloadModelTask, SleepTask)


def register_noop(app: Celery, settings: Settings) -> None:
    """Register ``fleet.diag.noop``: a bare Celery task, outside :class:`FleetTask`, so it costs what Celery costs.

    The overhead benchmark (``benchmarks/overhead_bench.py``) compares a model job's round trip against it.
    """

    @app.task(name=TaskName.NOOP.value, bind=True, shared=False)  # type: ignore[untyped-decorator]
    def noop(self: Any, floats: int = 0, **_: Any) -> dict[str, Any]:
        if not settings.diagnostics:
            raise errors.InvalidRequestError(
                f"{TaskName.NOOP.value} is a diagnostic task and diagnostics are off on {self.request.hostname}; "
                "start the worker with GPUFLEET_DIAGNOSTICS=true to use it (test fleets only)"
            )
        # Numbers with as many digits as an embedding's (float32 values printed as Python floats).
        numbers = [random.uniform(-0.2, 0.2) for _ in range(floats)]
        return {"worker": str(self.request.hostname or ""), "floats": numbers}


def register_tasks(app: Celery, settings: Settings) -> None:
    """Register the fleet's tasks on ``app`` (worker side only), with the time limits of the settings."""
    register_noop(app, settings)
    limits = settings.jobs
    for task_class in TASKS:
        task = task_class()
        if task_class is LoadModelTask:  # loading a large checkpoint from cold storage takes longer than answering
            task.soft_time_limit, task.time_limit = limits.load_soft_time_limit_s, limits.load_time_limit_s
        else:
            task.soft_time_limit, task.time_limit = limits.soft_time_limit_s, limits.time_limit_s
        if isinstance(task, BatchedTask) and settings.batching.enabled:
            # Celery hands this task's reserved jobs to the batcher instead of the pool (workers.batching).
            task.Strategy = "gpufleet.workers.batching:batching_strategy"
        app.register_task(task)
