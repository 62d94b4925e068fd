"""The batcher's dispatch rules (workers.batching), on fake requests, timer and pool behind Celery's interfaces.

What reaches the pool, when: a full buffer at once; a lone job after ``max_wait_s``; jobs that gathered while a
batch ran as soon as it ends; nothing while another job holds the child; revoked jobs never. The real thing runs
in tests/integration/test_batching.py.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from celery.worker import state as worker_state

from gpufleet.tasks.settings import BatchingOptions
from gpufleet.workers.parent.batching import Batcher, BatchRun, model_of
from tests.support.clock import FakeClock


class FakeRequest:
    def __init__(self, job_id: str, model: str = "org/m", name: str = "fleet.embed", revoked: bool = False) -> None:
        self.id = job_id
        self.name = name
        self.task = SimpleNamespace(fleet_batch_size=1024)  # a batched fleet task (the batcher's limit applies)
        self.kwargs: Any = {"model": model, "texts": [job_id]}
        self._revoked = revoked
        self.calls: list[str] = []

    def revoked(self) -> bool:
        return self._revoked

    def on_success(self, outcome: Any) -> None:
        self.calls.append("success")

    def on_failure(self, exc_info: Any, **_: Any) -> None:
        self.calls.append("failure")


class FakeTimer:
    def __init__(self) -> None:
        self.pending: list[tuple[float, Any]] = []

    def call_after(self, delay_s: float, fn: Any) -> Any:
        entry = FakeEntry(self, delay_s, fn)
        self.pending.append((delay_s, entry))
        return entry

    def fire(self) -> None:
        due, self.pending = self.pending, []
        for _, entry in due:
            if not entry.cancelled:
                entry.fn()


class FakeEntry:
    def __init__(self, timer: FakeTimer, delay_s: float, fn: Any) -> None:
        self.delay_s, self.fn, self.cancelled = delay_s, fn, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeConsumer:
    def __init__(self) -> None:
        self.connection = object()
        self.timer = FakeTimer()
        self.pool = object()


@pytest.fixture
def dispatched(monkeypatch: pytest.MonkeyPatch) -> list[BatchRun]:
    runs: list[BatchRun] = []
    monkeypatch.setattr(BatchRun, "submit", lambda self, pool: runs.append(self))
    return runs


def make(max_batch_size: int = 4, max_wait_s: float = 0.002, *, in_burst: bool = True) -> tuple[Batcher, FakeConsumer]:
    """A batcher whose clock stands still, so every job arrives within max_wait_s of the one before.

    ``in_burst``: a job arrived just before the test's first one (it waits for company); else the worker was quiet.
    """
    consumer = FakeConsumer()
    options = BatchingOptions(max_batch_size=max_batch_size, max_wait_s=max_wait_s)
    batcher = Batcher(consumer, options, clock=FakeClock(100.0))
    if in_burst:
        batcher._last_arrival_s = batcher.clock()  # a job of the same burst arrived just now
    setattr(consumer, Batcher.ATTRIBUTE, batcher)
    return batcher, consumer


def ids(run: BatchRun) -> list[str]:
    return [request.id for request in run.requests]


def test_a_lone_job_after_a_quiet_spell_runs_at_once(dispatched: list[BatchRun]) -> None:
    batcher, consumer = make(in_burst=False)
    batcher.add(FakeRequest("a"))
    assert [ids(run) for run in dispatched] == [["a"]]
    dispatched[0].on_return([(False, "ok", 0.0)])
    batcher.clock.now += 1.0  # type: ignore[attr-defined]
    batcher.add(FakeRequest("b"))
    assert [ids(run) for run in dispatched] == [["a"], ["b"]]
    assert not consumer.timer.pending


def test_jobs_of_a_burst_wait_max_wait_for_company(dispatched: list[BatchRun]) -> None:
    batcher, consumer = make(max_batch_size=8, in_burst=False)
    batcher.add(FakeRequest("a"))
    dispatched[0].on_return([(False, "ok", 0.0)])
    batcher.add(FakeRequest("b"))  # the clock stands still: b arrives within max_wait_s of a
    assert len(dispatched) == 1
    assert [delay for delay, _ in consumer.timer.pending] == [0.002]
    batcher.add(FakeRequest("c"))
    consumer.timer.fire()
    assert [ids(run) for run in dispatched] == [["a"], ["b", "c"]]


def test_a_full_buffer_is_dispatched_at_once(dispatched: list[BatchRun]) -> None:
    batcher, _ = make(max_batch_size=3)
    for job_id in "abc":
        batcher.add(FakeRequest(job_id))
    assert [ids(run) for run in dispatched] == [["a", "b", "c"]]


def test_jobs_gathered_during_a_batch_run_together_when_it_ends(dispatched: list[BatchRun]) -> None:
    batcher, _ = make(max_batch_size=8, in_burst=False)
    batcher.add(FakeRequest("a"))
    for job_id in "bcd":
        batcher.add(FakeRequest(job_id))
    assert len(dispatched) == 1, "the child is busy: b, c, d wait"
    dispatched[0].on_return([(False, "ok", 0.0)])
    assert [ids(run) for run in dispatched] == [["a"], ["b", "c", "d"]]
    assert dispatched[0].requests[0].calls == ["success"]


def test_one_buffer_per_model_and_task(dispatched: list[BatchRun]) -> None:
    batcher, consumer = make(max_batch_size=8)
    batcher.add(FakeRequest("a", model="org/x"))
    batcher.add(FakeRequest("b", model="org/y"))
    batcher.add(FakeRequest("c", model="org/x", name="fleet.generate"))
    batcher.add(FakeRequest("d", model="org/x"))
    consumer.timer.fire()
    assert [ids(run) for run in dispatched] == [["a", "d"]]
    dispatched[0].on_return([(False, "ok", 0.0)] * 2)
    dispatched[1].on_return([(False, "ok", 0.0)])
    assert [ids(run) for run in dispatched] == [["a", "d"], ["b"], ["c"]]


def test_nothing_is_dispatched_while_another_job_holds_the_child(dispatched: list[BatchRun]) -> None:
    batcher, consumer = make()
    other = FakeRequest("load")
    worker_state.active_requests.add(other)  # type: ignore[arg-type]
    try:
        batcher.add(FakeRequest("a"))
        consumer.timer.fire()
        assert not dispatched, "a load holds the child"
        assert consumer.timer.pending, "the batcher looks again shortly"
    finally:
        worker_state.active_requests.discard(other)  # type: ignore[arg-type]
    consumer.timer.fire()
    assert [ids(run) for run in dispatched] == [["a"]]


def test_revoked_jobs_are_dropped_at_dispatch(dispatched: list[BatchRun]) -> None:
    batcher, consumer = make()
    batcher.add(FakeRequest("a", revoked=True))
    batcher.add(FakeRequest("b"))
    consumer.timer.fire()
    assert [ids(run) for run in dispatched] == [["b"]]


def test_a_failed_batch_hands_every_job_to_celery_and_frees_the_child(dispatched: list[BatchRun]) -> None:
    batcher, _ = make(max_batch_size=2)
    batcher.add(FakeRequest("a"))
    batcher.add(FakeRequest("b"))
    batcher.add(FakeRequest("c"))
    dispatched[0].on_failure(object())
    assert [r.calls for r in dispatched[0].requests] == [["failure"], ["failure"]]
    assert batcher.in_flight == 1 and ids(dispatched[1]) == ["c"]


def test_a_reconnect_starts_a_new_batcher() -> None:
    consumer = FakeConsumer()
    batcher = Batcher.for_consumer(consumer, BatchingOptions())
    assert Batcher.for_consumer(consumer, batcher.options) is batcher
    consumer.connection = object()
    assert Batcher.for_consumer(consumer, batcher.options) is not batcher


def test_model_of_a_malformed_request_is_none() -> None:
    request = FakeRequest("a")
    request.kwargs = ["not", "a", "mapping"]
    assert model_of(request) is None
