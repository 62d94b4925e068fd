"""The one job pipeline, on a real CPU runtime with real models and a real Redis result backend.

Every fleet job goes through :class:`Pipeline` (a job alone is a batch of one); these tests drive it directly
with the payloads the parent's batcher would send.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from gpufleet.gpu.errors import BudgetExceededError, ForwardError
from gpufleet.gpu.runtime.model import LoadedModel
from gpufleet.tasks.app import create_app
from gpufleet.tasks.contracts import EmbedRequest, EmbedResult, Rerouted
from gpufleet.tasks.fleet import FleetRegistry, HeldModel, WorkerRecord
from gpufleet.tasks.names import FORWARDED_HEADER
from gpufleet.tasks.routing import app_router
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
    # The registry is read fresh each time, so each test sees the workers it publishes at once.
    settings = load_settings(
        broker_url=redis_server.url(DB), result_backend=redis_server.url(DB + 1), fleet={"registry_cache_s": 0}
    )
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


def live_worker(name: str, budget_bytes: int, **fields: Any) -> WorkerRecord:
    """Another CPU worker's heartbeat, as the fleet registry holds it."""
    return WorkerRecord(
        name=name,
        host="box",
        pid=1,
        gpu_type="cpu",
        device="cpu",
        type_queue="cpu",
        direct_queue=f"cpu.{name}",
        memory_budget_bytes=budget_bytes,
        ready=True,
        heartbeat_at=time.time(),
        ttl_s=60,
        **fields,
    )


@pytest.fixture
def registry(redis_server: LocalRedis) -> Iterator[FleetRegistry]:
    """The fleet registry the app's router reads (the broker's database), empty before and after each test."""
    registry = FleetRegistry(redis_server.url(DB), cache_s=0)
    registry._client.flushdb()
    yield registry
    registry._client.flushdb()


def queued(redis_server: LocalRedis, queue: str) -> list[dict[str, Any]]:
    """The task messages waiting on ``queue`` (kombu's JSON envelopes)."""
    broker = redis.Redis.from_url(redis_server.url(DB))
    return [json.loads(raw) for raw in broker.lrange(queue, 0, -1)]


def test_out_of_memory_twice_reroutes_the_job_to_a_live_worker_with_more_memory(
    app: Celery,
    runtime: WorkerRuntime,
    registry: FleetRegistry,
    redis_server: LocalRedis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert runtime.pool is not None
    ours = runtime.pool.budget_bytes
    # A smaller worker holding the model would be the router's first choice for a new job; not for one that ran
    # out of memory here.
    registry.publish(live_worker("small@unit", ours // 2, resident=(HeldModel(model=EMBED_MODEL, bytes=2**20),)))
    registry.publish(live_worker("big@unit", ours * 2))
    monkeypatch.setattr(runtime, "faults", Faults.parse(f"oom:infer:{EMBED_MODEL}:2"))
    job = payload("fleet.embed", model=EMBED_MODEL, texts=["hello"])
    ((failed, info, _),) = Pipeline(app.tasks["fleet.embed"], [job], runtime).run()
    handed_back = getattr(info.exception, "exc", info.exception)  # billiard wraps it with its traceback
    assert failed and type(handed_back).__name__ == "Ignore", "handed back to Celery as re-sent, not failed"
    assert runtime.jobs_by_outcome.get("fleet.embed|rerouted", 0) >= 1
    # Straight to the larger worker: the shared queue could hand it back to this one (or to small@unit).
    (message,) = queued(redis_server, "cpu.big@unit")
    assert message["headers"]["id"] == job.id and message["headers"]["replaced_task_nesting"] == 1
    assert queued(redis_server, "cpu") == [] and queued(redis_server, "gpu.t4") == []
    # The caller's state says where it went, not this attempt's progress (item 2 of issue 21).
    where = Rerouted.from_meta(stored(app, job.id))
    assert where is not None and (where.rerouted_to, where.worker) == ("cpu.big@unit", "cpu-0@unit")
    assert "out of memory on cpu-0@unit" in where.reason


def test_out_of_memory_with_no_larger_live_worker_fails_clearly_instead_of_stranding_the_job(
    app: Celery,
    runtime: WorkerRuntime,
    registry: FleetRegistry,
    redis_server: LocalRedis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert runtime.pool is not None
    registry.publish(live_worker("same@unit", runtime.pool.budget_bytes))  # live, but no larger
    monkeypatch.setattr(runtime, "faults", Faults.parse(f"oom:infer:{EMBED_MODEL}:2"))
    job = payload("fleet.embed", model=EMBED_MODEL, texts=["hello"])
    ((failed, _, _),) = Pipeline(app.tasks["fleet.embed"], [job], runtime).run()
    refused = stored(app, job.id)["result"]
    assert failed and type(refused).__name__ == "CapacityError"
    assert "no live worker other than cpu-0@unit with more memory" in str(refused), str(refused)
    assert "same@unit" in str(refused) and "quantized variant" in str(refused)
    broker = redis.Redis.from_url(redis_server.url(DB))
    assert not [key for key in broker.keys("*") if key.startswith((b"gpu.", b"cpu"))], "nothing was re-sent"


def test_out_of_memory_without_a_registry_follows_the_plans_gpu_types(
    app: Celery,
    runtime: WorkerRuntime,
    registry: FleetRegistry,
    redis_server: LocalRedis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    router = app_router(app)
    assert router is not None
    monkeypatch.setattr(router, "fleet", lambda: None)  # what it answers with live routing off, or no Redis
    monkeypatch.setattr(runtime, "faults", Faults.parse(f"oom:infer:{EMBED_MODEL}:2"))
    job = payload("fleet.embed", model=EMBED_MODEL, texts=["hello"])
    ((failed, _, _),) = Pipeline(app.tasks["fleet.embed"], [job], runtime).run()
    assert failed
    broker = redis.Redis.from_url(redis_server.url(DB))
    gpu_queues = [key.decode() for key in broker.keys("gpu.*")]
    assert gpu_queues and any(m["headers"]["id"] == job.id for q in gpu_queues for m in queued(redis_server, q))
    where = Rerouted.from_meta(stored(app, job.id))
    assert where is not None and "no fleet registry" in where.reason


def shared_payload(routing_key: str, *, forwarded_by: str | None = None) -> JobPayload:
    """An embed job as taken from ``routing_key``, forwarded before by ``forwarded_by`` when given."""
    job = payload("fleet.embed", model=EMBED_MODEL, texts=["hello"])
    job.request_dict["delivery_info"] = {"redelivered": False, "routing_key": routing_key}
    if forwarded_by is not None:
        job.request_dict[FORWARDED_HEADER] = forwarded_by
    return job


def test_a_model_the_budget_cannot_hold_is_forwarded_once_from_a_shared_queue(
    app: Celery,
    runtime: WorkerRuntime,
    registry: FleetRegistry,
    redis_server: LocalRedis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def too_big(model_id: str, **_: Any) -> Acquired:
        raise BudgetExceededError(f"{model_id} needs 86.7 MiB; this cpu budget has 8.0 MiB")

    monkeypatch.setattr(runtime, "acquire", too_big)
    registry.publish(live_worker("roomy@unit", 2**34))
    fresh, again, direct = (
        shared_payload("cpu"),
        shared_payload("cpu", forwarded_by="cpu-9@unit"),
        shared_payload("cpu.cpu-0@unit"),
    )
    outcomes = Pipeline(app.tasks["fleet.embed"], [fresh, again, direct], runtime).run()
    assert [failed for failed, _, _ in outcomes] == [True, True, True]  # re-sent (Ignore), failed, failed
    (message,) = queued(redis_server, "cpu.roomy@unit")
    assert message["headers"]["id"] == fresh.id
    assert message["headers"][FORWARDED_HEADER] == "cpu-0@unit", "marked, so it is never forwarded again"
    assert message["headers"].get("replaced_task_nesting", 0) == 0, "a forward is not an out-of-memory hop"
    where = Rerouted.from_meta(stored(app, fresh.id))
    assert where is not None and where.rerouted_to == "cpu.roomy@unit" and "cannot hold it" in where.reason
    for job in (again, direct):  # forwarded already, or sent to this worker by name: it fails here
        refused = stored(app, job.id)["result"]
        assert type(refused).__name__ == "CapacityError" and "needs 86.7 MiB" in str(refused)
        assert "No other live worker" not in str(refused)


def test_a_model_nothing_live_can_hold_fails_naming_the_fleet(
    app: Celery, runtime: WorkerRuntime, registry: FleetRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    def too_big(model_id: str, **_: Any) -> Acquired:
        raise BudgetExceededError(f"{model_id} needs 86.7 MiB; this cpu budget has 8.0 MiB")

    monkeypatch.setattr(runtime, "acquire", too_big)
    registry.publish(live_worker("tiny@unit", 2**20))
    job = shared_payload("cpu")
    Pipeline(app.tasks["fleet.embed"], [job], runtime).run()
    refused = stored(app, job.id)["result"]
    assert type(refused).__name__ == "CapacityError"
    assert "No other live worker can take the job from the shared queue either" in str(refused)
    assert "tiny@unit" in str(refused), str(refused)


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
