"""Flower, as compose runs it (`celery --app tasks.app:app flower --basic-auth=...`), sends jobs through its
REST API and shows the workers; without credentials it refuses."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpufleet.workers.tools.launch import stop_process, tail
from gpufleet.workers.tools.local_redis import free_port
from tests.integration.conftest import RunningWorker

pytestmark = pytest.mark.integration

USER, PASSWORD = "ops", "s3cret-test"
EMBED = "sentence-transformers/all-MiniLM-L6-v2"


def celery_command() -> list[str]:
    script = shutil.which("celery") or str(Path(sys.executable).with_name("celery"))
    return [script] if Path(script).exists() else [sys.executable, "-m", "celery"]


def call(url: str, *, body: dict[str, Any] | None = None, auth: bool = True) -> Any:
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode())
    request.add_header("Content-Type", "application/json")
    if auth:
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def flower(worker: RunningWorker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("flower") / "flower.log"
    command = [
        *celery_command(),
        "--app",
        "gpufleet.tasks.app:app",
        "flower",
        f"--port={port}",
        "--address=127.0.0.1",
        f"--basic-auth={USER}:{PASSWORD}",
    ]
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            command,
            env={**os.environ, **worker.env},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/healthcheck", timeout=1) as response:
                response.read()
            break
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"flower exited:\n{tail(log_path)}")
            time.sleep(0.3)
    else:
        pytest.fail(f"flower did not start:\n{tail(log_path)}")
    yield base
    stop_process(process)


def test_send_task_through_flower_api(flower: str, worker: RunningWorker) -> None:
    sent = call(
        f"{flower}/api/task/send-task/fleet.embed",
        body={"kwargs": {"model": EMBED, "texts": ["sent through flower"]}},  # no queue: the fleet router decides
    )
    # Flower reads the state before it waits for the result, so poll until it reports SUCCESS.
    deadline = time.monotonic() + 120
    reply = call(f"{flower}/api/task/result/{sent['task-id']}?timeout=60")
    while reply["state"] != "SUCCESS" and time.monotonic() < deadline:
        time.sleep(0.2)
        reply = call(f"{flower}/api/task/result/{sent['task-id']}?timeout=5")
    assert reply["state"] == "SUCCESS", reply
    assert reply["result"]["dim"] == 384 and reply["result"]["worker"] == worker.name


def test_flower_sees_the_worker(flower: str, worker: RunningWorker) -> None:
    workers = call(f"{flower}/api/workers?refresh=1")
    assert worker.name in workers


def test_flower_refuses_without_credentials(flower: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        call(f"{flower}/api/workers", auth=False)
    assert refused.value.code == 401
    refused.value.close()  # an HTTPError holds the response's socket open


def test_a_job_the_fleet_refuses_comes_back_with_its_reason(flower: str) -> None:
    # Before, Flower answered a refused job with HTTP 500 and an empty body; the reason was only in its log.
    sent = call(
        f"{flower}/api/task/send-task/fleet.embed",
        body={"kwargs": {"model": "org/not-installed-anywhere", "texts": ["x"]}},
    )
    assert sent["state"] == "FAILURE"
    reply = call(f"{flower}/api/task/result/{sent['task-id']}")
    assert reply["state"] == "FAILURE"
    assert "not-installed-anywhere" in str(reply["result"])
