"""Dynamic batching on real workers: queued jobs for one model share a forward, and each caller gets exactly the
answer it would have got alone, once, whatever happens to the batch."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
import redis as redis_client

from tests.integration.conftest import RunningWorker, WorkerFactory

pytestmark = pytest.mark.integration

EMBED = "sentence-transformers/all-MiniLM-L6-v2"
CHAT = "gpufleet/tiny-chat"
SENTENCES = [f"sentence number {i} about {'GPUs ' * (i % 5)}and queues" for i in range(24)]
PROMPTS = [f"prompt {i}: {'once upon a time ' * (i % 4)}" for i in range(12)]


def pool_child_pid(worker: RunningWorker) -> int:
    return int(worker.client.status("gpu_status")[worker.name]["pid"])


UNBATCHED = {"GPUFLEET_BATCHING__ENABLED": "false"}


@pytest.fixture(scope="module")
def batched(module_worker_factory: WorkerFactory) -> RunningWorker:
    return module_worker_factory()


@pytest.fixture(scope="module")
def unbatched(module_worker_factory: WorkerFactory) -> RunningWorker:
    return module_worker_factory(UNBATCHED)


def warm(worker: RunningWorker) -> None:
    worker.client.embed(EMBED, ["warm"]).get(timeout=120)
    worker.client.generate(CHAT, prompt="warm", max_new_tokens=2).get(timeout=120)


def embed_all(worker: RunningWorker) -> list[dict[str, Any]]:
    jobs = [worker.client.embed(EMBED, [text], queue="cpu") for text in SENTENCES]
    return [job.get(timeout=120) for job in jobs]


def generate_all(worker: RunningWorker, **options: Any) -> list[dict[str, Any]]:
    jobs = [
        worker.client.generate(CHAT, prompt=prompt, max_new_tokens=4 + 3 * (i % 4), queue="cpu", **options)
        for i, prompt in enumerate(PROMPTS)
    ]
    return [job.get(timeout=180) for job in jobs]


def test_batched_embeddings_equal_unbatched(batched: RunningWorker, unbatched: RunningWorker) -> None:
    warm(batched)
    warm(unbatched)
    with_batching, without = embed_all(batched), embed_all(unbatched)
    assert max(r["timings"]["batch_size"] for r in with_batching) > 1, "queued jobs were not batched"
    assert {r["timings"]["batch_size"] for r in without} == {1}
    for one, other in zip(with_batching, without, strict=True):
        (vector,), (reference,) = one["embeddings"], other["embeddings"]
        assert max(abs(a - b) for a, b in zip(vector, reference, strict=True)) < 1e-5


def test_batched_greedy_generation_equals_unbatched(batched: RunningWorker, unbatched: RunningWorker) -> None:
    warm(batched)
    warm(unbatched)
    with_batching, without = generate_all(batched), generate_all(unbatched)
    assert max(r["timings"]["batch_size"] for r in with_batching) > 1, "queued jobs were not batched"
    fields = ("text", "prompt_tokens", "completion_tokens", "finish_reason")
    assert [[r[f] for f in fields] for r in with_batching] == [[r[f] for f in fields] for r in without]


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(batched: RunningWorker) -> None:
    warm(batched)
    options = {"temperature": 0.9, "top_p": 0.95, "seed": 11}
    alone = batched.client.generate(CHAT, prompt=PROMPTS[3], max_new_tokens=10, queue="cpu", **options).get(timeout=60)
    # Longer than the seeded job, so the crowd is still decoding when it joins (company, not a queue of loners).
    crowd = [batched.client.generate(CHAT, prompt=p, max_new_tokens=64, queue="cpu") for p in PROMPTS]
    in_batch = batched.client.generate(CHAT, prompt=PROMPTS[3], max_new_tokens=10, queue="cpu", **options)
    results = [job.get(timeout=120) for job in crowd] + [in_batch.get(timeout=120)]
    assert results[-1]["text"] == alone["text"]
    assert max(r["timings"]["batch_size"] for r in results) > 1


def test_a_failing_job_fails_alone(batched: RunningWorker) -> None:
    warm(batched)
    too_long = "word " * 5000  # over tiny-chat's context: refused when its prompt is prepared, before the batch
    jobs = [batched.client.generate(CHAT, prompt=p, max_new_tokens=3, queue="cpu") for p in PROMPTS[:5]]
    bad = batched.send("fleet.generate", kwargs={"model": CHAT, "prompt": too_long, "max_new_tokens": 3})
    malformed = batched.send("fleet.generate", kwargs={"model": CHAT, "prompt": 7})
    jobs += [batched.client.generate(CHAT, prompt=p, max_new_tokens=3, queue="cpu") for p in PROMPTS[5:10]]
    with pytest.raises(Exception, match="context") as raised:
        bad.get(timeout=120)
    assert type(raised.value).__name__ == "InferenceError"
    with pytest.raises(Exception, match="prompt") as raised:
        malformed.get(timeout=120)
    assert type(raised.value).__name__ == "InvalidRequestError"
    results = [job.get(timeout=120) for job in jobs]
    assert all(r["completion_tokens"] >= 1 for r in results)


def test_a_child_killed_mid_batch_requeues_every_job_and_each_is_answered_once(
    worker_factory: WorkerFactory,
) -> None:
    # A diagnostic job holds the child while the twelve jobs arrive, so they gather into one batch; that batch
    # loads the model slowly, and the pool child is killed (SIGKILL) during the load. Every job of the batch is
    # requeued, and the replacement child answers each.
    worker = worker_factory({"GPUFLEET_FAULTS": "slow:load:4"})
    hold = worker.send("fleet.diag.sleep", kwargs={"seconds": 1.5})
    deadline = time.monotonic() + 30
    while hold.state != "STARTED" and time.monotonic() < deadline:
        time.sleep(0.05)
    jobs = [worker.client.embed(EMBED, [text], queue="cpu") for text in SENTENCES[:12]]
    while jobs[0].state not in ("STARTED", "PROGRESS") and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    # STARTED, then PROGRESS: each job of the batch reports the load it waits for.
    assert {job.state for job in jobs} <= {"STARTED", "PROGRESS"}, "the twelve jobs run as one batch"
    os.kill(pool_child_pid(worker), signal.SIGKILL)
    results = [job.get(timeout=240) for job in jobs]
    assert [len(r["embeddings"]) for r in results] == [1] * 12
    backend = redis_client.Redis.from_url(worker.env["GPUFLEET_RESULT_BACKEND"])
    # The counter holds redeliveries (a first delivery is not counted): each job came back exactly once.
    redeliveries = [int(backend.get(f"gpufleet:deliveries:{job.id}") or 0) for job in jobs]
    assert redeliveries == [1] * 12, "each job of the killed batch was delivered again, once"


def test_two_workers_share_a_queue_fairly(worker_factory: WorkerFactory) -> None:
    first = worker_factory()
    db = int(first.env["GPUFLEET_BROKER_URL"].rsplit("/", 1)[1])
    second = worker_factory(db=db, name=f"cpu-{db}-second@test")
    for worker in (first, second):
        warm(worker)
    jobs = [first.client.embed(EMBED, [f"{text} ({n})"], queue="cpu") for n in range(8) for text in SENTENCES]
    results = [job.get(timeout=300) for job in jobs]
    served = {name: sum(r["worker"] == name for r in results) for name in (first.name, second.name)}
    assert min(served.values()) >= len(jobs) // 4, f"one worker hoarded the queue: {served}"


def test_revoked_job_waiting_in_a_batch_is_not_run(batched: RunningWorker) -> None:
    warm(batched)
    hold = batched.send("fleet.diag.sleep", kwargs={"seconds": 2})
    deadline = time.monotonic() + 10
    while hold.state != "STARTED" and time.monotonic() < deadline:
        time.sleep(0.05)
    waiting = [batched.client.embed(EMBED, [text], queue="cpu") for text in SENTENCES[:4]]
    waiting[1].revoke()
    hold.get(timeout=30)
    for index, job in enumerate(waiting):
        if index == 1:
            with pytest.raises(Exception, match="revoked"):
                job.get(timeout=60)
        else:
            assert job.get(timeout=60)["dim"] == 384
