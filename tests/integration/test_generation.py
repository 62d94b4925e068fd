"""Continuous batching on real workers: generate jobs join a running decode loop and are answered each at its own
end, stream their text, stop when revoked, and survive their pool child being killed."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
import redis as redis_client
from celery.result import AsyncResult

from gpufleet.tasks.errors import JobError
from gpufleet.tasks.streams import StreamDelta, read_stream
from tests.integration.conftest import RunningWorker, WorkerFactory

pytestmark = pytest.mark.integration

CHAT = "gpufleet/tiny-chat"  # random weights: greedy decoding never produces its end-of-sequence token


@pytest.fixture(scope="module")
def worker(module_worker_factory: WorkerFactory) -> RunningWorker:
    worker = module_worker_factory()
    worker.client.generate(CHAT, prompt="warm", max_new_tokens=2).get(timeout=120)
    return worker


def wait_for(predicate: Any, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def started(job: AsyncResult) -> bool:
    return job.state in ("STARTED", "SUCCESS")


def results_redis(worker: RunningWorker) -> redis_client.Redis:
    return redis_client.Redis.from_url(worker.env["GPUFLEET_RESULT_BACKEND"])


def test_a_short_job_that_comes_later_finishes_before_a_long_one(worker: RunningWorker) -> None:
    long = worker.client.generate(CHAT, prompt="once upon a time", max_new_tokens=1200)
    wait_for(lambda: started(long), what="the long job to start")
    time.sleep(0.2)  # the long job is decoding: the short one joins a running loop
    short = worker.client.generate(CHAT, prompt="hello", max_new_tokens=6).get(timeout=60)
    assert not long.ready(), "the short job was answered while the long one still ran"
    assert short["completion_tokens"] == 6 and short["finish_reason"] == "length"
    assert short["timings"]["batch_size"] >= 2, "the short job ran in the long one's company"
    assert long.get(timeout=120)["completion_tokens"] == 1200


def test_jobs_in_company_equal_the_same_jobs_alone(worker: RunningWorker) -> None:
    prompts = [f"prompt {i}: {'once upon a time ' * (i % 3)}" for i in range(6)]
    options = [{"prompt": p, "max_new_tokens": 5 + 7 * i} for i, p in enumerate(prompts)]
    alone = [worker.client.generate(CHAT, **o).get(timeout=60) for o in options]
    together = [worker.client.generate(CHAT, **o) for o in options]
    got = [job.get(timeout=120) for job in together]
    assert [r["text"] for r in got] == [r["text"] for r in alone]
    assert [r["completion_tokens"] for r in got] == [5 + 7 * i for i in range(6)]


def test_seeded_sampling_is_the_same_alone_and_in_company(worker: RunningWorker) -> None:
    sampled = {"prompt": "the queue holds", "max_new_tokens": 24, "temperature": 0.9, "top_p": 0.95, "seed": 11}
    alone = worker.client.generate(CHAT, **sampled).get(timeout=60)["text"]
    neighbour = worker.client.generate(CHAT, prompt="a long neighbour", max_new_tokens=400)
    wait_for(lambda: started(neighbour), what="the neighbour to start")
    in_company = worker.client.generate(CHAT, **sampled).get(timeout=60)["text"]
    assert in_company == alone
    neighbour.get(timeout=120)


def test_streamed_deltas_concatenate_to_the_result(worker: RunningWorker) -> None:
    items = list(worker.client.generate_stream(CHAT, prompt="once upon a time", max_new_tokens=40))
    deltas, result = items[:-1], items[-1]
    assert isinstance(result, dict) and result["completion_tokens"] == 40
    assert len(deltas) > 5 and all(isinstance(d, StreamDelta) for d in deltas)
    assert "".join(d.text for d in deltas if isinstance(d, StreamDelta)) == result["text"]


def test_a_late_reader_and_a_resuming_reader_get_every_delta(worker: RunningWorker) -> None:
    job = worker.client.generate(CHAT, prompt="the queue holds", max_new_tokens=50, stream=True)
    result = job.get(timeout=60)  # the stream is read only after the job ended
    client = results_redis(worker)
    late = list(read_stream(client, job.id, timeout_s=10))
    assert late[-1] == result
    assert "".join(d.text for d in late[:-1] if isinstance(d, StreamDelta)) == result["text"]
    first = late[:3]
    assert all(isinstance(d, StreamDelta) for d in first)
    resumed = list(read_stream(client, job.id, after_id=first[-1].entry_id, timeout_s=10))  # type: ignore[union-attr]
    text = "".join(d.text for d in [*first, *resumed[:-1]] if isinstance(d, StreamDelta))
    assert text == result["text"] and resumed[-1] == result


def test_a_revoked_running_job_stops_early_and_its_neighbour_is_unaffected(worker: RunningWorker) -> None:
    neighbour_options = {"prompt": "a GPU fleet serves many models and", "max_new_tokens": 300}
    expected = worker.client.generate(CHAT, **neighbour_options).get(timeout=60)["text"]
    doomed = worker.client.generate(CHAT, prompt="once upon a time", max_new_tokens=2000, stream=True)
    neighbour = worker.client.generate(CHAT, **neighbour_options)
    client = results_redis(worker)
    stream = read_stream(client, doomed.id, timeout_s=60)
    assert isinstance(next(stream), StreamDelta)  # it is generating
    revoked_at = time.monotonic()
    doomed.revoke()
    with pytest.raises(JobError, match="cancelled"):
        for _ in stream:
            pass
    wait_for(lambda: doomed.state == "REVOKED", timeout_s=10, what="the job to be REVOKED")
    assert time.monotonic() - revoked_at < 5, "generation stopped within a few steps, not after 2000 tokens"
    assert neighbour.get(timeout=120)["text"] == expected


def test_closing_a_stream_early_cancels_its_job(worker: RunningWorker) -> None:
    stream = worker.client.generate_stream(CHAT, prompt="once upon a time", max_new_tokens=2000)
    first = next(stream)
    assert isinstance(first, StreamDelta) and first.job_id
    stream.close()  # the reader went away (cancel_on_close)
    job = AsyncResult(first.job_id, app=worker.client.app)
    wait_for(lambda: job.state == "REVOKED", timeout_s=15, what="the job revoked")


def test_a_child_killed_mid_generation_answers_every_job_once(worker_factory: WorkerFactory) -> None:
    worker = worker_factory()
    options = [{"prompt": f"story {i}", "max_new_tokens": 1200 + 50 * i} for i in range(6)]
    expected = [worker.client.generate(CHAT, **o).get(timeout=120)["text"] for o in options]
    pid = int(worker.client.status("gpu_status")[worker.name]["pid"])
    jobs = [worker.client.generate(CHAT, **o) for o in options]
    wait_for(lambda: all(started(job) for job in jobs), what="every job to join the loop")
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    assert not any(job.ready() for job in jobs), "all six were generating when the child died"
    results = [job.get(timeout=240) for job in jobs]
    assert [r["text"] for r in results] == expected
    client = results_redis(worker)
    redeliveries = [int(client.get(f"gpufleet:deliveries:{job.id}") or 0) for job in jobs]
    assert redeliveries == [1] * 6, "each job of the killed session was delivered again, once"


def test_the_cli_prints_a_streamed_job_as_it_comes(worker: RunningWorker) -> None:
    import subprocess
    import sys
    from pathlib import Path

    expected = worker.client.generate(CHAT, prompt="hello cli", max_new_tokens=20).get(timeout=60)["text"]
    cli = Path(sys.executable).with_name("gpufleet")
    done = subprocess.run(
        [str(cli), "submit", "generate", CHAT, "--prompt", "hello cli", "--max-new-tokens", "20", "--stream"],
        env={**os.environ, **worker.env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert done.stdout == expected + "\n"
    assert "completion_tokens=20" in done.stderr


def test_the_static_engine_still_answers_a_streamed_job(worker_factory: WorkerFactory) -> None:
    static = worker_factory({"GPUFLEET_GENERATION__ENGINE": "static"})
    *deltas, final = static.client.generate_stream(CHAT, prompt="once upon a time", max_new_tokens=10)
    assert isinstance(final, dict) and final["completion_tokens"] == 10
    assert "".join(d.text for d in deltas if isinstance(d, StreamDelta)) == final["text"]


def test_a_warm_shutdown_finishes_running_sequences_and_requeues_waiting_ones(worker_factory: WorkerFactory) -> None:
    # One sequence at a time, so the second and third job wait in the loop when the worker is told to stop.
    first = worker_factory({"GPUFLEET_GENERATION__MAX_RUNNING": "1"})
    first.client.generate(CHAT, prompt="warm", max_new_tokens=2).get(timeout=120)
    jobs = [first.client.generate(CHAT, prompt=f"story {i}", max_new_tokens=600) for i in range(3)]
    wait_for(lambda: started(jobs[0]), what="the first job to start")
    time.sleep(0.3)
    first.process.send_signal(signal.SIGTERM)  # Celery's warm shutdown
    assert jobs[0].get(timeout=120)["completion_tokens"] == 600, "the running sequence finished"
    first.process.wait(timeout=60)
    db = int(first.env["GPUFLEET_BROKER_URL"].rsplit("/", 1)[1])
    second = worker_factory(db=db, name=f"cpu-{db}-second@test")
    results = [job.get(timeout=180) for job in jobs[1:]]
    assert [r["worker"] for r in results] == [second.name] * 2, "the waiting jobs were given back, not lost"
