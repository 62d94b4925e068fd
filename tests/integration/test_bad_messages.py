"""Messages a worker cannot run, crafted with raw kombu: the caller gets a contract error, not silence.

Each message carries its task id in protocol 2 headers; the worker (workers.consumer.ContractConsumer) stores an
InvalidRequestError for that id and drops the message, and keeps serving.
"""

from __future__ import annotations

import json
import pickle
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult

from gpufleet.tasks.errors import InvalidRequestError
from tests.integration.conftest import RunningWorker

pytestmark = pytest.mark.integration

EMBED = "sentence-transformers/all-MiniLM-L6-v2"
# Every answer here comes from the consumer, before any model work: a slow one means the message was dropped and
# the result came from somewhere else (or never).
ANSWER_TIMEOUT_S = 30
RESULT_TIMEOUT_S = 120
GOOD_KWARGS = {"model": EMBED, "texts": ["hello"]}


class TouchOnUnpickle:
    """Unpickling this creates ``path``: the marker that the worker decoded pickle (it must never)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (str(self.path), "w")


def headers(task_id: str, task: str = "fleet.embed") -> dict[str, Any]:
    """Protocol 2 headers, as Celery's producer writes them (the id and task name live here, not in the body)."""
    return {
        "lang": "py",
        "task": task,
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "shadow": None,
        "eta": None,
        "expires": None,
        "retries": 0,
        "timelimit": [None, None],
        "argsrepr": "()",
        "kwargsrepr": "{}",
        "origin": "test_bad_messages",
        "ignore_result": False,
    }


def publish_raw(
    worker: RunningWorker, body: bytes, content_type: str, *, task: str = "fleet.embed", encoding: str = "utf-8"
) -> AsyncResult:
    """Put ``body`` on the worker's ``cpu`` queue as-is (kombu serializes nothing) and return its result handle."""
    task_id = str(uuid.uuid4())
    app = worker.client.app
    with app.producer_or_acquire() as producer:
        producer.publish(
            body,
            exchange="",
            routing_key="cpu",
            content_type=content_type,
            content_encoding=encoding,
            headers=headers(task_id, task),
            retry=True,
        )
    return app.AsyncResult(task_id)


def json_body(args: Any, kwargs: Any, embed: Any) -> bytes:
    return json.dumps([args, kwargs, embed]).encode()


def expect_refusal(result: AsyncResult, *fragments: str) -> InvalidRequestError:
    """The result fails with InvalidRequestError naming every fragment, within ANSWER_TIMEOUT_S."""
    started = time.monotonic()
    with pytest.raises(InvalidRequestError) as raised:
        result.get(timeout=ANSWER_TIMEOUT_S)
    elapsed_s = time.monotonic() - started
    for fragment in fragments:
        assert fragment in str(raised.value), str(raised.value)
    assert elapsed_s < ANSWER_TIMEOUT_S
    return raised.value


def still_serving(worker: RunningWorker) -> None:
    ok = worker.client.embed(EMBED, ["still serving"]).get(timeout=RESULT_TIMEOUT_S)
    assert ok["dim"] == 384


def test_pickle_body_is_refused_never_decoded(worker: RunningWorker, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    body = pickle.dumps(((), {"model": EMBED, "texts": [TouchOnUnpickle(marker)]}, {}))
    result = publish_raw(worker, body, "application/x-python-serialize", encoding="binary")
    expect_refusal(result, "'application/x-python-serialize' is refused", "serializer='json'")
    assert not marker.exists(), "the worker unpickled the message body"
    still_serving(worker)


def test_broken_json_is_answered(worker: RunningWorker) -> None:
    result = publish_raw(worker, b'[[], {"model": "x", "texts": [', "application/json")
    expect_refusal(result, "could not be decoded as JSON", "serializer='json'")
    still_serving(worker)


def test_unknown_content_type_is_answered(worker: RunningWorker) -> None:
    result = publish_raw(worker, json_body([], GOOD_KWARGS, {}), "application/x-gpufleet-unknown")
    expect_refusal(result, "'application/x-gpufleet-unknown' is refused")
    still_serving(worker)


def test_unknown_task_name_is_answered(worker: RunningWorker) -> None:
    result = publish_raw(worker, json_body([], GOOD_KWARGS, {}), "application/json", task="fleet.no_such_task")
    error = expect_refusal(result, "unknown task 'fleet.no_such_task'", "fleet.embed")
    assert type(error) is InvalidRequestError  # not Celery's NotRegistered: only contract errors reach callers
    still_serving(worker)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (json_body([], ["model", EMBED], {}), "kwargs must be a mapping; got list"),
        (json_body("x", GOOD_KWARGS, {}), "args must be a list; got str"),
        (json_body([], GOOD_KWARGS, []), "embed part must be a mapping; got list"),
        (json.dumps({"kwargs": GOOD_KWARGS}).encode(), "mapping without 'args'"),
        (json.dumps(["only", "two"]).encode(), "[args, kwargs, embed]"),
        # Celery's own hybrid (protocol 1 body) check, answered the same way.
        (json.dumps({"args": [], "kwargs": ["x"]}).encode(), "keyword arguments must be a mapping"),
    ],
    ids=["kwargs-list", "args-str", "embed-list", "mapping-without-args", "two-parts", "hybrid-kwargs-list"],
)
def test_malformed_body_is_answered(worker: RunningWorker, body: bytes, fragment: str) -> None:
    result = publish_raw(worker, body, "application/json")
    expect_refusal(result, "not a valid task message", fragment)
    still_serving(worker)


def test_a_final_result_is_never_overwritten(worker: RunningWorker) -> None:
    """A bad copy of a finished job's message (same id) must not replace the real answer."""
    done = worker.client.embed(EMBED, ["real answer"])
    assert done.get(timeout=RESULT_TIMEOUT_S)["dim"] == 384
    app = worker.client.app
    with app.producer_or_acquire() as producer:
        producer.publish(
            b"not json",
            exchange="",
            routing_key="cpu",
            content_type="application/json",
            content_encoding="utf-8",
            headers=headers(done.id),
            retry=True,
        )
    # The worker handles messages in order: once a later good job is answered, the bad copy was dealt with.
    still_serving(worker)
    again = app.AsyncResult(done.id)
    assert again.state == "SUCCESS" and again.get(timeout=5)["dim"] == 384
