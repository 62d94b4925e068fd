"""The fleet's task bodies: each says what its jobs do; the pipeline (:mod:`gpufleet.workers.child.pipeline`) runs
them.

Parsing, delivery counting, error mapping, timings, the OOM policy and storing results are the pipeline's. The
diagnostic tasks ``fleet.diag.sleep`` and ``fleet.diag.noop`` (a bare Celery task) answer only on a worker started
with ``GPUFLEET_DIAGNOSTICS=true``.
"""

from __future__ import annotations

import base64
import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from gpufleet.gpu.runtime.batching import Embedded, EmbedJob, EncodedPrompt, embed_batch, encode_prompt, generate_batch
from gpufleet.gpu.runtime.model import Generation, LoadedModel
from gpufleet.gpu.runtime.options import GenerateOptions
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
from gpufleet.workers.child.runtime import WorkerRuntime
from gpufleet.workers.child.task_base import EngineKind, FleetTask, Served

if TYPE_CHECKING:
    from gpufleet.workers.child.job import Job, JobServices


class EmbedTask(FleetTask[EmbedRequest]):
    name = TaskName.EMBED.value
    request_model = EmbedRequest
    result_model = EmbedResult
    engine = EngineKind.BATCHED

    def prepare(self, loaded: LoadedModel, request: EmbedRequest) -> EmbedJob:
        return EmbedJob(request.texts, request.normalize, packed=request.encoding == "base64")

    def compute_batch(self, runtime: WorkerRuntime, loaded: LoadedModel, items: Sequence[EmbedJob]) -> list[Any]:
        return embed_batch(loaded, items, max_batch_tokens=runtime.settings.batching.max_batch_tokens)

    def result_fields(self, request: EmbedRequest, output: Embedded) -> dict[str, Any]:
        if output.packed:
            vectors: dict[str, Any] = {
                "embeddings": [],
                "embeddings_base64": [base64.b64encode(vector).decode("ascii") for vector in output.packed],
                "dim": len(output.packed[0]) // 4,
            }
        else:
            vectors = {"embeddings": output.vectors, "dim": len(output.vectors[0])}
        return {
            **vectors,
            "normalized": request.normalize,
            "prompt_tokens": output.tokens,
            "text_tokens": output.text_tokens,
        }


class GenerateTask(FleetTask[GenerateRequest]):
    name = TaskName.GENERATE.value
    request_model = GenerateRequest
    result_model = GenerateResult
    engine = EngineKind.BATCHED

    def prepare(self, loaded: LoadedModel, request: GenerateRequest) -> EncodedPrompt:
        return encode_prompt(loaded, generate_options(request))

    def compute_batch(self, runtime: WorkerRuntime, loaded: LoadedModel, items: Sequence[EncodedPrompt]) -> list[Any]:
        return generate_batch(loaded, items)

    def result_fields(self, request: GenerateRequest, output: Generation) -> dict[str, Any]:
        return {
            "text": output.text,
            "prompt_tokens": output.prompt_tokens,
            "completion_tokens": output.completion_tokens,
            "finish_reason": output.finish_reason,
        }


def generate_options(request: GenerateRequest) -> GenerateOptions:
    """The runtime's options for a ``fleet.generate`` request (the one mapping from the contract)."""
    return GenerateOptions(
        prompt=request.prompt,
        messages=None if request.messages is None else [m.model_dump() for m in request.messages],
        max_new_tokens=request.max_new_tokens,
        temperature=float(request.temperature),
        top_p=float(request.top_p),
        seed=request.seed,
        stop=tuple(request.stop),
    )


class LoadModelTask(FleetTask[LoadModelRequest]):
    name = TaskName.LOAD_MODEL.value
    request_model = LoadModelRequest
    result_model = LoadModelResult

    def serve(self, pipeline: JobServices, job: Job) -> Served | None:
        request: LoadModelRequest = job.request
        acquired = pipeline.acquire(request.model, [job], pinned=request.priority)
        if acquired is None:
            return None
        fields = {
            "action": acquired.action,
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

    def serve(self, pipeline: JobServices, job: Job) -> Served:
        started = time.perf_counter()
        freed = pipeline.runtime.unload(job.request.model)
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

    def serve(self, pipeline: JobServices, job: Job) -> Served:
        runtime = pipeline.runtime
        request: SleepRequest = job.request
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
        # The parent's batcher gathers up to this many queued jobs for one model into one batch (1: each alone).
        if task.engine is EngineKind.BATCHED and settings.batching.enabled:
            task.fleet_batch_size = settings.batching.max_batch_size
        # The parent runs these jobs in generation sessions (workers/parent/sessions.py): a decode loop they join.
        if task_class is GenerateTask and settings.generation.engine == "continuous":
            task.fleet_continuous = True
        app.register_task(task)
