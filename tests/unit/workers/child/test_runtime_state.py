"""When the runtime publishes its snapshot: model changes at once, a job's bookkeeping once the worker is quiet."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gpufleet.workers.child import state
from gpufleet.workers.child.runtime import (
    JOB_STATE_MAX_DELAY_S,
    JOB_STATE_QUIET_S,
    OPENMP_SPIN_DEFAULTS,
    WorkerRuntime,
    bound_openmp_spin,
)
from gpufleet.workers.common.snapshot import state_path
from tests.support.runtimes import cpu_runtime, cpu_settings


class Published:
    """An ``on_change`` hook that writes the real snapshot file and remembers each publish."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.snapshots: list[dict[str, Any]] = []
        self.threads: list[str] = []

    def __call__(self, runtime: WorkerRuntime) -> None:
        state.publish(runtime, self.path)
        self.snapshots.append(json.loads(self.path.read_text()))
        self.threads.append(threading.current_thread().name)


def runtime_with(tmp_path: Path, **overrides: object) -> tuple[WorkerRuntime, Published]:
    published = Published(state_path(cpu_settings(tmp_path), "cpu-0@unit"))
    return cpu_runtime(tmp_path, start=False, on_change=published, **overrides), published


def wait_for(predicate: Any, timeout_s: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return bool(predicate())


def test_a_short_job_writes_nothing_on_its_path_and_one_snapshot_after(tmp_path: Path) -> None:
    runtime, published = runtime_with(tmp_path)
    runtime.begin_job("job-1", "fleet.embed", "org/a")
    runtime.end_job("fleet.embed", "ok")
    assert published.snapshots == [], "begin and end write no file in the job's thread"
    assert wait_for(lambda: len(published.snapshots) == 1)
    time.sleep(2 * JOB_STATE_QUIET_S)
    assert len(published.snapshots) == 1, "the start and the end of a short job are one write"
    last = published.snapshots[-1]
    assert last["running_job"] is None and last["jobs_done"] == 1
    assert last["metrics"]["jobs_by_outcome"] == {"fleet.embed|ok": 1}
    assert published.threads == ["gpufleet-job-state"]
    runtime.stop()


def test_a_job_still_running_after_the_quiet_period_is_shown_running(tmp_path: Path) -> None:
    runtime, published = runtime_with(tmp_path)
    runtime.begin_job("job-2", "fleet.generate", "org/b")
    assert wait_for(lambda: bool(published.snapshots))
    assert published.snapshots[-1]["running_job"]["id"] == "job-2"
    runtime.end_job("fleet.generate", "InferenceError")
    assert wait_for(lambda: published.snapshots[-1]["running_job"] is None)
    assert published.snapshots[-1]["metrics"]["jobs_by_outcome"] == {"fleet.generate|InferenceError": 1}
    assert published.snapshots[-1]["jobs_done"] == 0
    runtime.stop()


def test_a_stream_of_jobs_publishes_a_few_times_a_second(tmp_path: Path) -> None:
    runtime, published = runtime_with(tmp_path)
    stream_s = 3 * JOB_STATE_MAX_DELAY_S
    deadline = time.monotonic() + stream_s
    jobs = 0
    while time.monotonic() < deadline:  # back to back, never quiet
        runtime.begin_job(f"job-{jobs}", "fleet.embed", "org/a")
        time.sleep(0.005)
        runtime.end_job("fleet.embed", "ok")
        jobs += 1
    during = len(published.snapshots)
    assert 2 <= during <= 6, f"{during} writes for {jobs} jobs over {stream_s:g} s"
    assert wait_for(lambda: bool(published.snapshots) and published.snapshots[-1]["jobs_done"] == jobs)
    runtime.stop()


def test_changed_publishes_at_once_and_carries_the_pending_bookkeeping(tmp_path: Path) -> None:
    runtime, published = runtime_with(tmp_path)
    runtime.begin_job("job-3", "fleet.load_model", "org/a")
    runtime.end_job("fleet.load_model", "ok")
    runtime.changed()  # e.g. a load: the caller may look at the status as soon as it has the result
    assert len(published.snapshots) == 1 and published.snapshots[0]["jobs_done"] == 1
    assert published.threads == [threading.current_thread().name]
    assert not runtime.job_state.pending, "the deferred write was folded into this one"
    time.sleep(3 * JOB_STATE_QUIET_S)
    assert len(published.snapshots) == 1
    runtime.stop()


def test_a_pin_on_a_resident_model_is_published_before_the_result(tiny_model_root: Path, tmp_path: Path) -> None:
    runtime, published = runtime_with(tmp_path, model_root=tiny_model_root, gpu={"warmup": {"size": "small"}})
    runtime.start()
    runtime.acquire("org/a")
    writes = len(published.snapshots)
    assert runtime.acquire("org/a").action == "already-loaded"
    assert len(published.snapshots) == writes, "a plain hit writes nothing"
    assert runtime.acquire("org/a", pinned=True).action == "already-loaded"
    assert len(published.snapshots) == writes + 1
    assert published.snapshots[-1]["models"]["loaded"][0]["pinned"] is True
    runtime.stop()


def test_stop_drops_the_deferred_write_for_the_final_one(tmp_path: Path) -> None:
    runtime, published = runtime_with(tmp_path)
    runtime.begin_job("job-4", "fleet.embed", "org/a")
    runtime.stop()
    time.sleep(3 * JOB_STATE_QUIET_S)
    assert published.snapshots == []
    runtime.changed()  # what the pool child's shutdown hook does after stop()
    assert published.snapshots[-1]["ready"] is False and published.snapshots[-1]["running_job"]["id"] == "job-4"


def test_openmp_spin_is_bounded_before_torch_loads_and_an_operators_value_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*OPENMP_SPIN_DEFAULTS, "OMP_WAIT_POLICY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(sys.modules, "torch", sys)  # torch already loaded: too late, nothing is set
    assert bound_openmp_spin() is False
    assert not any(name in os.environ for name in OPENMP_SPIN_DEFAULTS)
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the operator's policy: a spin count would override it
    assert bound_openmp_spin() is True
    assert not any(name in os.environ for name in OPENMP_SPIN_DEFAULTS)
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    assert bound_openmp_spin() is True
    assert os.environ["GOMP_SPINCOUNT"] == "5" and os.environ["KMP_BLOCKTIME"] == OPENMP_SPIN_DEFAULTS["KMP_BLOCKTIME"]
