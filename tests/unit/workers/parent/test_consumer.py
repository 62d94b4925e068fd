"""workers.consumer without a broker: which messages carry an id, which bodies are refused, and the answers.

The real path (a worker consuming crafted messages) is tests/integration/test_bad_messages.py.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from celery.exceptions import InvalidTaskError
from kombu.exceptions import ContentDisallowed, DecodeError

from gpufleet.tasks.errors import InvalidRequestError
from gpufleet.workers.parent.consumer import (
    CONSUMER_PATH,
    ContractConsumer,
    check_body_shape,
    checked_strategy,
    task_identity,
)


def message(headers: Any = None, payload: Any = None, content_type: str = "application/json") -> Any:
    """A stand-in for kombu's Message with what the consumer reads; it records ack/reject."""
    calls: list[str] = []
    return SimpleNamespace(
        headers=headers,
        payload=payload,
        content_type=content_type,
        content_encoding="utf-8",
        properties={"correlation_id": "c", "reply_to": "r"},
        delivery_info={"routing_key": "cpu"},
        calls=calls,
        ack=lambda: calls.append("ack"),
        reject_log_error=lambda logger, errors: calls.append("reject"),
    )


def test_task_identity_reads_protocol_2_headers_only() -> None:
    assert task_identity(message({"id": "abc", "task": "fleet.embed"})) == ("abc", "fleet.embed")
    assert task_identity(message({"id": "abc"})) is None  # a control message, or protocol 1
    assert task_identity(message({"task": "fleet.embed", "id": ""})) is None
    assert task_identity(message({"task": "fleet.embed", "id": 7})) is None
    assert task_identity(message(None)) is None


@pytest.mark.parametrize(
    "payload",
    [[[], {"model": "m"}, {}], ([], {}, None), [["x"], {}, {"callbacks": None}], {"args": [], "kwargs": ["x"]}],
)
def test_well_formed_bodies_pass(payload: Any) -> None:
    check_body_shape(payload)  # the hybrid form (a mapping with args) is Celery's to check


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ([[], ["model"], {}], "kwargs must be a mapping; got list"),
        (["x", {}, {}], "args must be a list; got str"),
        ([[], {}, "x"], "embed part must be a mapping; got str"),
        ([[], {}], "got list of length 2"),
        ("text", "got str"),
        (None, "got NoneType"),
        ({"kwargs": {}}, "mapping without 'args'"),
    ],
)
def test_malformed_bodies_are_refused(payload: Any, fragment: str) -> None:
    with pytest.raises(InvalidTaskError, match=fragment.replace("[", r"\[")):
        check_body_shape(payload)


def test_checked_strategy_checks_only_deferred_protocol_2_bodies() -> None:
    seen: list[Any] = []

    def strategy(msg: Any, body: Any, *rest: Any) -> str:
        seen.append(body)
        return "ran"

    wrapped = checked_strategy(strategy)
    assert wrapped(message(payload=[[], {}, {}]), None, "ack", "reject", []) == "ran"
    # A body Celery already decoded (protocol 1) is passed through untouched.
    assert wrapped(message(payload="never read"), {"task": "x"}, "ack", "reject", []) == "ran"
    with pytest.raises(InvalidTaskError):
        wrapped(message(payload=[[], [], {}]), None, "ack", "reject", [])
    assert seen == [None, {"task": "x"}]


class FakeBackend:
    def __init__(self, state: str = "PENDING", fail: bool = False) -> None:
        self.state, self.fail = state, fail
        self.stored: list[tuple[str, Exception, Any]] = []

    def get_state(self, task_id: str) -> str:
        if self.fail:
            raise ConnectionError("backend down")
        return self.state

    def mark_as_failure(self, task_id: str, exc: Exception, request: Any = None, call_errbacks: bool = True) -> None:
        self.stored.append((task_id, exc, request))


def consumer(backend: FakeBackend) -> Any:
    """A ContractConsumer without Celery's start-up (only what the answering path reads)."""
    instance = ContractConsumer.__new__(ContractConsumer)
    events: list[tuple[str, dict[str, Any]]] = []
    instance.app = SimpleNamespace(backend=backend, tasks={"fleet.embed": 1, "fleet.generate": 1, "celery.chord": 1})
    instance.hostname = "cpu-0@test"
    instance.connection_errors = ()
    instance.event_dispatcher = SimpleNamespace(send=lambda kind, **fields: events.append((kind, fields)))
    instance.events = events
    return instance


def test_decode_error_stores_a_contract_error_then_acks() -> None:
    backend = FakeBackend()
    c = consumer(backend)
    msg = message({"id": "j1", "task": "fleet.embed"})
    c.on_decode_error(msg, DecodeError("Expecting value: line 1 column 1"))
    ((task_id, exc, request),) = backend.stored
    assert task_id == "j1" and isinstance(exc, InvalidRequestError)
    assert "could not be decoded as JSON: Expecting value" in str(exc) and "serializer='json'" in str(exc)
    assert request.task == "fleet.embed" and request.hostname == "cpu-0@test"
    assert msg.calls == ["ack"]
    assert c.events[0][0] == "task-failed" and c.events[0][1]["uuid"] == "j1"


def test_refused_content_type_names_it() -> None:
    backend = FakeBackend()
    msg = message({"id": "j2", "task": "fleet.embed"}, content_type="application/x-python-serialize")
    consumer(backend).on_invalid_task(None, msg, ContentDisallowed("Refusing to deserialize untrusted content"))
    ((_, exc, _),) = backend.stored
    assert "'application/x-python-serialize' is refused" in str(exc)
    assert msg.calls == ["reject"]


def test_unknown_task_lists_the_fleet_tasks_not_celery_internals() -> None:
    backend = FakeBackend()
    msg = message({"id": "j3", "task": "fleet.nope"})
    consumer(backend).on_unknown_task(None, msg, KeyError("fleet.nope"))
    ((_, exc, _),) = backend.stored
    assert str(exc) == "unknown task 'fleet.nope': this worker serves fleet.embed, fleet.generate; check the task name"
    assert msg.calls == ["reject"]


def test_a_final_result_is_not_overwritten_and_backend_errors_do_not_escape() -> None:
    done = FakeBackend(state="SUCCESS")
    consumer(done).on_decode_error(message({"id": "j4", "task": "fleet.embed"}), DecodeError("x"))
    assert done.stored == []
    down = FakeBackend(fail=True)
    msg = message({"id": "j5", "task": "fleet.embed"})
    consumer(down).on_decode_error(msg, DecodeError("x"))  # logged, not raised: the consumer keeps consuming
    assert msg.calls == ["ack"]


def test_a_message_without_an_id_is_dropped_without_an_answer() -> None:
    backend = FakeBackend()
    msg = message({"clock": 1})  # e.g. a control (pidbox) message with a bad body
    consumer(backend).on_decode_error(msg, DecodeError("x"))
    assert backend.stored == [] and msg.calls == ["ack"]


def test_the_consumer_path_names_the_class() -> None:
    module, name = CONSUMER_PATH.split(":")
    assert module == ContractConsumer.__module__ and name == ContractConsumer.__name__
