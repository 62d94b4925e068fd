"""The one job pipeline, on a real CPU runtime with real models and a real Redis result backend.

Every fleet job goes through :class:`Pipeline` (a job alone is a batch of one); these tests drive it directly
with the payloads the parent's batcher would send.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from gpufleet.gpu.errors import ForwardError
from gpufleet.gpu.runtime.model import LoadedModel
from gpufleet.tasks.app import create_app
from gpufleet.tasks.contracts import EmbedRequest, EmbedResult
from gpufleet.tasks.settings import load_settings
from gpufleet.workers.child.faults import Faults
from gpufleet.workers.child.jobs import register_tasks
from gpufleet.workers.child.pipeline import Pipeline
from gpufleet.workers.child.runtime import Acquired, WorkerRuntime
from gpufleet.workers.child.task_base import EngineKind, FleetTask
from gpufleet.workers.common.jobs import JobPayload
from gpufleet.workers.tools.demo import EMBED_MODEL
from gpufleet.workers.tools.local_redis import LocalRedis
from tests.support.runtimes import cpu_runtime

DB = 74


@pytest.fixture(scope="module")
def app(redis_server: LocalRedis) -> Celery:
    settings = load_settings(broker_url=redis_server.url(DB), result_backend=redis_server.url(DB + 1))
    app = create_app(settings)
    register_tasks(app, settings)
    app.register_task(Poisonable())
    return app


@pytest.fixture(scope="module")
def runtime(model_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerRuntime]:
    runtime = cpu_runtime(tmp_path_factory.mktemp("state"), model_root=model_root, diagnostics=True)
    runtime.acquire(EMBED_MODEL)
    yield runtime
    runtime.stop()


def payload(task: str, *, redelivered: bool = False, **kwargs: Any) -> JobPayload:
    job_id = str(uuid.uuid4())
    request = {"id": job_id, "task": task, "delivery_info": {"redelivered": redelivered}, "hostname": "cpu-0@unit"}
    return JobPayload(job_id, [], kwargs, request)


def stored(app: Celery, job_id: str) -> dict[str, Any]:
    meta: dict[str, Any] = app.backend.get_task_meta(job_id)
    return meta


class Counting:
    """Counts the runtime's acquisitions (wraps the real method)."""

    def __init__(self, runtime: WorkerRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, int]] = []
        real = runtime.acquire

        def acquire(model_id: str, **kwargs: Any) -> Acquired:
            self.calls.append((model_id, kwargs.get("jobs", 1)))
            return real(model_id, **kwargs)

        monkeypatch.setattr(runtime, "acquire", acquire)


def hits(runtime: WorkerRuntime) -> int:
    assert runtime.cache is not None
    return runtime.cache.stats().hits


def test_a_batch_acquires_once_counts_a_hit_per_job_and_stores_every_answer(
    app: Celery, runtime: WorkerRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = Counting(runtime, monkeypatch)
    jobs = [payload("fleet.embed", model=EMBED_MODEL, texts=[f"sentence {i}"]) for i in range(3)]
    jobs.insert(1, payload("fleet.embed", model=EMBED_MODEL, texts=[]))  # invalid: fails alone, at once
    before = hits(runtime)
    outcomes = Pipeline(app.tasks["fleet.embed"], jobs, runtime).run()
    assert [failed for failed, _, _ in outcomes] == [False, True, False, False], "one outcome per job, in order"
    assert counting.calls == [(EMBED_MODEL, 3)], "the model is acquired once for the batch's three valid jobs"
    assert hits(runtime) - before == 3, "the cache counts jobs, not lookups"
    answers = [stored(app, job.id) for job in jobs]
    assert [a["status"] for a in answers] == ["SUCCESS", "FAILURE", "SUCCESS", "SUCCESS"]
    refused = answers[1]["result"]
    assert type(refused).__name__ == "InvalidRequestError" and "texts" in str(refused)
    result = EmbedResult.model_validate(answers[0]["result"])
    assert result.dim == 384 and result.timings.batch_size == 3 and result.worker == "cpu-0@unit"


class Poisonable(FleetTask[EmbedRequest]):
    """A batched task whose forward fails whenever a job's text says "poison" is in the batch."""

    name = "test.poisonable"
    request_model = EmbedRequest
    result_model = EmbedResult
    engine = EngineKind.BATCHED
    forwards: list[int] = []  # batch sizes seen

    def prepare(self, loaded: LoadedModel, request: EmbedRequest) -> str:
        return request.texts[0]

    def compute_batch(self, runtime: WorkerRuntime, loaded: LoadedModel, items: Sequence[Any]) -> list[Any]:
        self.forwards.append(len(items))
        if "poison" in items:
            raise ForwardError("a poisoned batch")
        return [[[0.0, 1.0]] for _ in items]

    def result_fields(self, request: EmbedRequest, output: Any) -> dict[str, Any]:
        return {"embeddings": output, "dim": 2, "normalized": request.normalize}


def test_a_failing_forward_is_split_until_the_failing_job_fails_alone(app: Celery, runtime: WorkerRuntime) -> None:
    texts = ["a", "b", "c", "poison", "e", "f"]
    jobs = [payload("test.poisonable", model=EMBED_MODEL, texts=[text]) for text in texts]
    Poisonable.forwards.clear()
    outcomes = Pipeline(app.tasks["test.poisonable"], jobs, runtime).run()
    assert [failed for failed, _, _ in outcomes] == [text == "poison" for text in texts]
    assert Poisonable.forwards[0] == 6 and Poisonable.forwards.count(1) >= 1, "halved down to the poisoned job"
    assert type(stored(app, jobs[3].id)["result"]).__name__ == "InferenceError"


def test_a_job_redelivered_too_often_fails_and_the_rest_run(app: Celery, runtime: WorkerRuntime) -> None:
    poison = payload("fleet.embed", redelivered=True, model=EMBED_MODEL, texts=["x"])
    client = redis.Redis.from_url(app.conf.result_backend)
    from gpufleet.tasks.fleet import DELIVERIES_KEY

    client.set(DELIVERIES_KEY.format(job_id=poison.id), 5)
    fine = payload("fleet.embed", model=EMBED_MODEL, texts=["y"])
    outcomes = Pipeline(app.tasks["fleet.embed"], [poison, fine], runtime).run()
    assert [failed for failed, _, _ in outcomes] == [True, False]
    assert "delivered 7 times" in str(stored(app, poison.id)["result"])


def test_out_of_memory_twice_reroutes_the_job_with_its_id(
    app: Celery, runtime: WorkerRuntime, redis_server: LocalRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "faults", Faults.parse(f"oom:infer:{EMBED_MODEL}:2"))
    job = payload("fleet.embed", model=EMBED_MODEL, texts=["hello"])
    ((failed, info, _),) = Pipeline(app.tasks["fleet.embed"], [job], runtime).run()
    handed_back = getattr(info.exception, "exc", info.exception)  # billiard wraps it with its traceback
    assert failed and type(handed_back).__name__ == "Ignore", "handed back to Celery as re-sent, not failed"
    assert runtime.jobs_by_outcome.get("fleet.embed|rerouted", 0) >= 1
    broker = redis.Redis.from_url(redis_server.url(DB))
    queued = [key.decode() for key in broker.keys("gpu.*")]
    assert queued, "the job waits on a larger GPU type's queue"
    assert any(job.id.encode() in message for key in queued for message in broker.lrange(key, 0, -1))


def test_loads_and_unloads_go_through_the_same_pipeline_one_by_one(app: Celery, runtime: WorkerRuntime) -> None:
    from gpufleet.workers.tools.demo import CHAT_MODEL

    load = payload("fleet.load_model", model=CHAT_MODEL)
    again = payload("fleet.load_model", model=CHAT_MODEL)
    outcomes = Pipeline(app.tasks["fleet.load_model"], [load, again], runtime).run()
    assert [failed for failed, _, _ in outcomes] == [False, False]
    assert [stored(app, p.id)["result"]["action"] for p in (load, again)] == ["loaded", "already-loaded"]
    unload = payload("fleet.unload_model", model=CHAT_MODEL)
    Pipeline(app.tasks["fleet.unload_model"], [unload], runtime).run()
    assert stored(app, unload.id)["result"]["action"] == "unloaded"
