"""Per-job bookkeeping kept cheap: the deferred publisher's timing rules, and delivery counts on a real Redis."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis

from gpufleet.tasks import errors
from gpufleet.tasks.app import create_app
from gpufleet.tasks.fleet import DELIVERIES_KEY
from gpufleet.tasks.settings import load_settings
from gpufleet.workers.child.job_accounting import DeferredCall, count_delivery
from gpufleet.workers.child.task_base import check_deliveries
from gpufleet.workers.tools.local_redis import LocalRedis

DB = 70


class Recorder:
    """Counts calls and the thread each ran on; can be told to fail."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail = False
        self.ran = threading.Event()

    def __call__(self) -> None:
        self.calls.append(threading.current_thread().name)
        self.ran.set()
        if self.fail:
            raise RuntimeError("publish failed")


def wait_for(predicate: Any, timeout_s: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return bool(predicate())


# -- DeferredCall -----------------------------------------------------------------------------------------------


def test_a_burst_of_requests_runs_once_after_the_quiet_period() -> None:
    fn = Recorder()
    deferred = DeferredCall(fn, quiet_s=0.05, max_delay_s=1.0, name="test-deferred")
    started = time.monotonic()
    for _ in range(20):
        deferred.request()
    assert deferred.pending and fn.calls == [], "nothing runs in the requesting thread"
    assert fn.ran.wait(2.0)
    assert time.monotonic() - started >= 0.05
    time.sleep(0.15)
    assert fn.calls == ["test-deferred"] and not deferred.pending
    deferred.stop()


def test_a_steady_stream_still_runs_every_max_delay() -> None:
    fn = Recorder()
    deferred = DeferredCall(fn, quiet_s=0.05, max_delay_s=0.1, name="test-stream")
    deadline = time.monotonic() + 0.45
    while time.monotonic() < deadline:  # never quiet for 50 ms
        deferred.request()
        time.sleep(0.01)
    runs_while_busy = len(fn.calls)
    deferred.stop()
    # About one run per 100 ms of a 450 ms stream; the trailing rule alone would have run none.
    assert 2 <= runs_while_busy <= 6


def test_due_time_follows_the_last_request_capped_by_the_first() -> None:
    now = [0.0]
    deferred = DeferredCall(Recorder(), quiet_s=10.0, max_delay_s=20.0, name="test-due", clock=lambda: now[0])
    assert deferred.due_in_s() is None
    deferred.request()
    assert deferred.due_in_s() == 10.0
    now[0] = 5.0
    deferred.request()
    assert deferred.due_in_s() == 10.0  # quiet again until 15
    now[0] = 12.0
    deferred.request()
    assert deferred.due_in_s() == 8.0  # 22 would be later than the first request's 20
    now[0] = 30.0
    assert deferred.due_in_s() == 0.0
    deferred.stop()


def test_cancel_flush_and_stop() -> None:
    fn = Recorder()
    deferred = DeferredCall(fn, quiet_s=0.05, max_delay_s=0.1, name="test-cancel")
    deferred.request()
    deferred.cancel()
    time.sleep(0.2)
    assert fn.calls == [] and not deferred.pending
    assert deferred.flush() is False, "nothing pending, nothing to run"
    deferred.request()
    assert deferred.flush() is True and fn.calls == [threading.current_thread().name]
    deferred.stop()
    deferred.request()
    time.sleep(0.15)
    assert len(fn.calls) == 1 and not deferred.pending, "a stopped publisher ignores requests"


def test_a_failing_call_is_logged_and_retried_on_the_next_request(caplog: pytest.LogCaptureFixture) -> None:
    fn = Recorder()
    fn.fail = True
    deferred = DeferredCall(fn, quiet_s=0.0, max_delay_s=0.0, name="test-failing")
    deferred.request()
    assert wait_for(lambda: deferred.runs == 1)
    assert "test-failing failed" in caplog.text
    fn.fail = False
    deferred.request()
    assert wait_for(lambda: deferred.runs == 2) and len(fn.calls) == 2
    deferred.stop()


def test_bad_timings_are_refused() -> None:
    with pytest.raises(ValueError, match="quiet_s <= max_delay_s"):
        DeferredCall(Recorder(), quiet_s=1.0, max_delay_s=0.5, name="x")


# -- delivery counts ----------------------------------------------------------------------------------------------


@pytest.fixture
def backend(redis_server: LocalRedis) -> redis.Redis:
    client = redis.Redis.from_url(redis_server.url(DB))
    client.flushdb()
    return client


def test_a_first_delivery_costs_no_round_trip(backend: redis.Redis) -> None:
    assert count_delivery(backend, "job-1", redelivered=False, ttl_s=60, max_deliveries=2) == (1, False)
    assert backend.exists(DELIVERIES_KEY.format(job_id="job-1")) == 0


def test_redeliveries_are_counted_with_a_ttl(backend: redis.Redis) -> None:
    counts = [count_delivery(backend, "job-2", redelivered=True, ttl_s=60, max_deliveries=2) for _ in range(2)]
    assert counts == [(2, False), (3, True)]
    ttl_s = backend.ttl(DELIVERIES_KEY.format(job_id="job-2"))
    assert 0 < int(ttl_s) <= 60


def test_a_job_redelivered_too_often_is_failed(redis_server: LocalRedis, backend: redis.Redis) -> None:
    """The pipeline's one delivery check (``check_deliveries``): Redis is asked only about redeliveries."""
    settings = load_settings(
        broker_url=redis_server.url(DB), result_backend=redis_server.url(DB), jobs={"max_deliveries": 2}
    )
    app = create_app(settings)
    check_deliveries(app, "job-3", {"redelivered": False}, settings)  # the first delivery: not counted in Redis
    assert backend.exists(DELIVERIES_KEY.format(job_id="job-3")) == 0
    check_deliveries(app, "job-3", {"redelivered": True}, settings)  # the second: allowed
    with pytest.raises(errors.JobError, match="delivered 3 times"):
        check_deliveries(app, "job-3", {"redelivered": True}, settings)
