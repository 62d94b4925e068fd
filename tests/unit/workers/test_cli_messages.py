"""What the `gpufleet` command line tells a person: help, model listings, plans, load bars, waiting jobs.

Each test pins one thing a new user hit (issue 21, items 12, 13, 14, 16, 18, 19); ``test_cli.py`` runs the
commands themselves.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from celery.result import AsyncResult

from gpufleet.tasks.client import ROUTE_ATTRIBUTE
from gpufleet.tasks.errors import FleetError
from gpufleet.tasks.fleet import FleetRegistry
from gpufleet.tasks.live_routing import RouteDecision
from gpufleet.workers.cli import WAITING_NOTICE_S, _wait, main, waiting_notice
from gpufleet.workers.tools.local_redis import LocalRedis
from tests.support.fleet_records import GiB, worker

MiB = 2**20
SMALL = "Qwen/Qwen2.5-0.5B-Instruct"


@pytest.fixture
def app(redis_server: LocalRedis) -> Iterator[Celery]:
    celery = Celery("cli-messages", backend=redis_server.url(121), broker=redis_server.url(120))
    celery.conf.update(result_serializer="json", accept_content=["json"], result_accept_content=["json"])
    yield celery
    celery.close()


def test_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out, "reStructuredText markup in --help"
    assert "Serve many Hugging Face models on a fleet of mixed GPUs" in out


def test_listing_a_root_that_does_not_exist_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nonexistent"
    assert main(["models", "list", str(missing)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"{missing} is not a directory" in captured.err and "gpufleet models make-demo" in captured.err
    # An empty root is a root: nothing listed, exit 0, and a note on stderr saying what a model looks like.
    assert main(["models", "list", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and f"no models under {tmp_path}" in captured.err


def test_plan_has_a_title_naming_the_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "openai-community/gpt2"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "plan for openai-community/gpt2"


def test_plan_of_a_model_not_installed_never_says_to_send_a_job(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("GPUFLEET_MODEL_ROOT", str(tmp_path))
    monkeypatch.setenv("GPUFLEET_HF_CACHE", str(tmp_path / "hf"))
    assert main(["plan", "openai-community/gpt2"]) == 0
    err = capsys.readouterr().err
    assert "is not installed" in err and "Planned from its name instead" in err
    assert "send the job again" not in err, "`gpufleet plan` sends no job"


def test_plan_live_shows_budgets_in_readable_units_and_names_the_model(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], redis_server: LocalRedis
) -> None:
    registry = FleetRegistry(redis_server.url(122), cache_s=0.0)
    registry._client.flushdb()
    now = time.time()
    registry.publish(worker("cpu-small@x", memory_budget_bytes=8 * MiB, heartbeat_at=now))
    registry.publish(worker("cpu-big@x", memory_budget_bytes=8 * GiB, heartbeat_at=now))
    monkeypatch.setenv("GPUFLEET_BROKER_URL", redis_server.url(122))
    monkeypatch.setenv("GPUFLEET_RESULT_BACKEND", redis_server.url(123))
    assert main(["plan", "--live", SMALL]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"plan for {SMALL} on the live fleet"
    assert "budget 8.0 MiB, used 0 B" in out and "0.01 GiB" not in out
    assert "budget 8.0 GiB, used 0 B" in out
    why = next(line for line in out.splitlines() if line.startswith("why: "))
    assert f"can hold {SMALL!r} (1.9 GiB of weights)" in why and "can hold cpu" not in why


def test_a_fast_load_draws_its_last_frame(app: Celery, capsys: pytest.CaptureFixture[str]) -> None:
    job = AsyncResult(str(uuid.uuid4()), app=app)
    app.backend.store_result(job.id, {"bytes_done": 0, "bytes_total": 12 * MiB}, "PROGRESS")
    # The load finishes between two polls: the bar's only frame seen was its first.
    finish = threading.Timer(0.3, app.backend.store_result, (job.id, {"model": "m", "action": "loaded"}, "SUCCESS"))
    finish.start()
    try:
        assert _wait(job, timeout_s=10.0, progress=True) == {"model": "m", "action": "loaded"}
    finally:
        finish.join()
    err = capsys.readouterr().err
    frames = [frame for frame in err.rstrip("\n").split("\r") if frame]
    assert frames[0].endswith("0.0/12.0 MiB")
    assert frames[-1] == f"loading [{'#' * 30}] 12.0/12.0 MiB", "the final frame is drawn"
    assert err.endswith("\n")


def test_a_failed_load_keeps_its_last_frame(app: Celery, capsys: pytest.CaptureFixture[str]) -> None:
    job = AsyncResult(str(uuid.uuid4()), app=app)
    app.backend.store_result(job.id, {"bytes_done": 3 * MiB, "bytes_total": 12 * MiB}, "PROGRESS")
    fail = threading.Timer(0.3, app.backend.mark_as_failure, (job.id, FleetError("load failed")))
    fail.start()
    try:
        with pytest.raises(FleetError):
            _wait(job, timeout_s=10.0, progress=True)
    finally:
        fail.join()
    assert "12.0/12.0 MiB" not in capsys.readouterr().err, "a load that failed is not drawn as complete"


def test_a_job_waiting_on_its_queue_says_once_where_and_why(app: Celery, capsys: pytest.CaptureFixture[str]) -> None:
    job = AsyncResult(str(uuid.uuid4()), app=app)  # never taken: PENDING
    reason = "no ready worker can run it yet: cpu-a@x is warming up; it can hold 'm' (1.0 MiB of weights)"
    setattr(job, ROUTE_ATTRIBUTE, RouteDecision(queue="cpu", worker=None, reason=reason, gpu_type="cpu"))
    with pytest.raises(FleetError, match="still waiting on queue 'cpu'"):
        _wait(job, timeout_s=WAITING_NOTICE_S + 0.6)
    err = capsys.readouterr().err
    line = f"job {job.id} has not started after 1 s: it waits on queue 'cpu', where the router sent it: {reason}\n"
    assert err == line, "said once, on a line of its own"
    # A job a worker has started is no longer waiting: nothing to say.
    app.backend.store_result(job.id, {"worker": "cpu-a@x"}, "STARTED")
    assert waiting_notice(job, WAITING_NOTICE_S) is None
