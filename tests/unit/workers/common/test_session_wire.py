"""The generation session's wire: messages split across reads, answers that survive the trip, payloads intact."""

from __future__ import annotations

import json

from gpufleet.workers.common.jobs import JobPayload
from gpufleet.workers.common.session_wire import (
    Answer,
    LineReader,
    encode,
    new_address,
    payload_from_wire,
    payload_to_wire,
)


def test_messages_split_across_reads_come_out_whole_and_in_order() -> None:
    data = encode({"t": "idle", "fed": 1}) + encode({"t": "done", "id": "a", "kind": "ok"})
    reader = LineReader()
    got = reader.feed(data[:7]) + reader.feed(data[7:30]) + reader.feed(data[30:])
    assert got == [{"t": "idle", "fed": 1}, {"t": "done", "id": "a", "kind": "ok"}]
    assert reader.feed(b"") == []


def test_an_answer_survives_the_wire() -> None:
    answer = Answer("job-1", "error", 1.5, error_type="InferenceError", error_message="bad", traceback="tb")
    message = json.loads(encode(answer.to_wire()))
    assert message["t"] == "done"
    assert Answer.from_wire(message) == answer


def test_a_payload_survives_the_wire() -> None:
    payload = JobPayload("id", [], {"model": "m", "prompt": "hi"}, {"delivery_info": {"redelivered": True}})
    assert payload_from_wire(json.loads(encode(payload_to_wire(payload)))) == payload


def test_addresses_are_fresh() -> None:
    assert new_address() != new_address()
