"""A generation session in-process, on a real CPU runtime, real tiny-chat and a real Redis result backend.

Without a socket (the parent's side), a session serves the jobs it started with and answers each at its end.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from gpufleet.tasks.app import create_app
from gpufleet.tasks.settings import load_settings
from gpufleet.tasks.streams import StreamDelta, read_stream
from gpufleet.workers.child.jobs import register_tasks
from gpufleet.workers.child.runtime import WorkerRuntime
from gpufleet.workers.child.session import GenerationSession
from gpufleet.workers.common.jobs import JobPayload
from gpufleet.workers.tools.demo import CHAT_MODEL
from gpufleet.workers.tools.local_redis import LocalRedis
from tests.support.runtimes import cpu_runtime

DB = 76


@pytest.fixture(scope="module")
def app(redis_server: LocalRedis) -> Celery:
    settings = load_settings(broker_url=redis_server.url(DB), result_backend=redis_server.url(DB + 1))
    app = create_app(settings)
    register_tasks(app, settings)
    return app


@pytest.fixture(scope="module")
def runtime(model_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerRuntime]:
    runtime = cpu_runtime(tmp_path_factory.mktemp("state"), model_root=model_root)
    runtime.acquire(CHAT_MODEL)
    yield runtime
    runtime.stop()


def payload(**kwargs: Any) -> JobPayload:
    job_id = str(uuid.uuid4())
    request = {"id": job_id, "task": "fleet.generate", "delivery_info": {"redelivered": False}}
    return JobPayload(job_id, [], {"model": CHAT_MODEL, **kwargs}, request)


def test_each_job_is_answered_counted_once_and_its_stream_ends_with_its_result(
    app: Celery, runtime: WorkerRuntime, redis_server: LocalRedis
) -> None:
    assert runtime.cache is not None
    jobs = [payload(prompt=f"story {i}", max_new_tokens=4 + 6 * i, stream=i == 1) for i in range(3)]
    jobs.append(payload(prompt="", max_new_tokens=4))  # invalid: answered at once, alone
    hits_before = runtime.cache.stats().hits
    answers = GenerationSession(app.tasks["fleet.generate"], runtime, None).run(jobs)
    assert {a.id: a.kind for a in answers} == {**{j.id: "ok" for j in jobs[:3]}, jobs[3].id: "error"}
    assert runtime.cache.stats().hits - hits_before == 3, "one cache hit per valid job"
    results = [app.backend.get_task_meta(j.id)["result"] for j in jobs[:3]]
    assert [r["completion_tokens"] for r in results] == [4, 10, 16]
    assert [r["timings"]["batch_size"] >= 1 for r in results] == [True] * 3
    client = redis.Redis.from_url(redis_server.url(DB + 1))
    streamed = list(read_stream(client, jobs[1].id, timeout_s=5))
    assert streamed[-1] == results[1]
    assert "".join(d.text for d in streamed if isinstance(d, StreamDelta)) == results[1]["text"]
    report = runtime.generation.report()[CHAT_MODEL]
    assert report.generated_tokens >= 30 and report.sequences_running == 0
    assert runtime.pool is not None and not any(k.startswith("kv:") for k in runtime.pool.reservations()), (
        "the KV reservation ends with the session"
    )


def test_a_sequence_still_out_of_memory_is_rerouted_to_a_live_worker_with_more_memory(
    app: Celery, runtime: WorkerRuntime, redis_server: LocalRedis
) -> None:
    """The session's own OOM path (a sequence its decode loop could not relieve) uses the live fleet too."""
    import json
    import time

    from gpufleet.gpu.errors import DeviceOutOfMemoryError
    from gpufleet.gpu.runtime.continuous import SequenceFailed
    from gpufleet.tasks.contracts import Rerouted
    from gpufleet.tasks.fleet import FleetRegistry, WorkerRecord
    from gpufleet.workers.child.pipeline import Pipeline
    from gpufleet.workers.child.session import _Live

    assert runtime.pool is not None
    registry = FleetRegistry(redis_server.url(DB), cache_s=0)
    registry._client.flushdb()
    bigger = WorkerRecord(
        name="big@unit",
        host="box",
        pid=1,
        gpu_type="cpu",
        device="cpu",
        type_queue="cpu",
        direct_queue="cpu.big@unit",
        memory_budget_bytes=2 * runtime.pool.budget_bytes,
        ready=True,
        heartbeat_at=time.time(),
        ttl_s=60,
    )
    registry.publish(bigger)
    session = GenerationSession(app.tasks["fleet.generate"], runtime, None)
    pipeline = Pipeline(app.tasks["fleet.generate"], [payload(prompt="long story", max_new_tokens=4)], runtime)
    (job,) = pipeline.admit()
    session._failed(_Live(pipeline, job, 0.0, 0.0, None, False), SequenceFailed(job.id, DeviceOutOfMemoryError("oom")))
    assert pipeline.answers[0] is not None and pipeline.answers[0].kind == "ignore", "re-sent, not failed"
    broker = redis.Redis.from_url(redis_server.url(DB))
    (message,) = [json.loads(raw) for raw in broker.lrange("cpu.big@unit", 0, -1)]
    assert message["headers"]["id"] == job.id
    where = Rerouted.from_meta(app.backend.get_task_meta(job.id))
    assert where is not None and where.rerouted_to == "cpu.big@unit"
    registry._client.flushdb()
