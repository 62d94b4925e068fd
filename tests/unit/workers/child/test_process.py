"""The pool child's lifecycle: what it tells the worker's log about when jobs are really taken."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from gpufleet.workers.child.process import announce_ready
from gpufleet.workers.common.identity import cpu_identity


class _Control:
    """Celery's ``app.control``, answering ``add_consumer`` for one worker (after one silent try, as while the
    worker's control loop still starts)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.asked: list[str] = []

    def add_consumer(self, queue: str, **_: Any) -> list[dict[str, Any]]:
        self.asked.append(queue)
        return [] if len(self.asked) == 1 else [{self.name: {"ok": f"add consumer {queue}"}}]


class _App:
    def __init__(self, name: str) -> None:
        self.control = _Control(name)


def test_the_worker_log_says_when_jobs_are_really_taken(caplog: pytest.LogCaptureFixture) -> None:
    identity = cpu_identity(name="cpu-a@box")
    app = _App(identity.name)
    with caplog.at_level(logging.INFO, logger="gpufleet.workers.child.process"):
        announce_ready(app, identity, timeout_s=5.0)
    assert set(app.control.asked) == set(identity.consumed_queues)
    (line,) = [r for r in caplog.records if r.levelno == logging.INFO]
    assert line.getMessage() == f"cpu-a@box is taking jobs now: consuming {', '.join(identity.consumed_queues)}"
