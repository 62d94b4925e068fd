"""Fleet errors become OpenAI's error object with the status OpenAI's clients map."""

from __future__ import annotations

import json

import pytest

from gpufleet.tasks import errors
from gpufleet.tasks.api.openai.errors import from_fleet_error


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (errors.InvalidRequestError("bad"), 400, "invalid_request"),
        (errors.ModelNotFoundError("no such model"), 404, "model_not_found"),
        (errors.RoutingError("nothing can hold it"), 503, "no_capable_worker"),
        (errors.CapacityError("too big"), 503, "no_capable_worker"),
        (errors.BrokerUnavailableError("redis down"), 503, "broker_unavailable"),
        (TimeoutError("too slow"), 504, "timeout"),
        (errors.InferenceError("the forward failed"), 500, "InferenceError"),
        (ValueError("surprise"), 500, "internal_error"),
    ],
)
def test_status_and_body(error: BaseException, status: int, code: str) -> None:
    mapped = from_fleet_error(error)
    assert (mapped.status, mapped.code) == (status, code)
    body = json.loads(bytes(mapped.response().body))
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert str(error) in body["error"]["message"]


def test_an_unreachable_broker_says_when_to_retry() -> None:
    assert from_fleet_error(errors.BrokerUnavailableError("down")).headers == {"Retry-After": "5"}
