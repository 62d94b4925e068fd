from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from gpufleet.tasks.contracts import (
    EmbedRequest,
    GenerateRequest,
    LoadModelRequest,
    UnloadModelRequest,
    validate_request,
)
from gpufleet.tasks.errors import InvalidRequestError


def test_embed_request_defaults() -> None:
    request = EmbedRequest.model_validate({"model": "a/b", "texts": ["hi"]})
    assert request.normalize is True


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"model": "a/b", "texts": []}, "texts"),
        ({"model": "a/b", "texts": ["  "]}, "empty"),
        ({"model": "a/b", "texts": "one string"}, "texts"),
        ({"model": "a/b", "texts": [1, 2]}, "texts"),
        ({"model": "a/b", "texts": ["x"], "normalise": True}, "normalise"),
        ({"model": "", "texts": ["x"]}, "model"),
        ({"texts": ["x"]}, "model"),
    ],
)
def test_embed_request_refusals(payload: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        EmbedRequest.model_validate(payload)


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"model": "a/b"}, "exactly one"),
        ({"model": "a/b", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "exactly one"),
        ({"model": "a/b", "prompt": "x", "max_new_tokens": -1}, "max_new_tokens"),
        ({"model": "a/b", "prompt": "x", "max_new_tokens": "5"}, "max_new_tokens"),
        ({"model": "a/b", "prompt": "x", "temperature": -0.1}, "temperature"),
        ({"model": "a/b", "messages": [{"role": "robot", "content": "y"}]}, "role"),
        ({"model": "a/b", "prompt": "x", "beams": 4}, "beams"),
    ],
)
def test_generate_request_refusals(payload: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        GenerateRequest.model_validate(payload)


def test_load_request_priority_must_be_bool() -> None:
    with pytest.raises(ValidationError):
        LoadModelRequest.model_validate({"model": "a/b", "priority": "yes"})


@pytest.mark.parametrize("request_model", [EmbedRequest, GenerateRequest, LoadModelRequest, UnloadModelRequest])
@pytest.mark.parametrize("model_id", ["../x", "/etc/passwd", "org/../../x", "org/na me"])
def test_every_request_refuses_unsafe_model_ids(request_model: type[BaseModel], model_id: str) -> None:
    extra: dict[str, Any] = {
        EmbedRequest: {"texts": ["x"]},
        GenerateRequest: {"prompt": "x"},
        LoadModelRequest: {},
        UnloadModelRequest: {},
    }[request_model]
    with pytest.raises(InvalidRequestError, match=r"model: .*is not allowed: use 'org/name'"):
        validate_request(request_model, {"model": model_id, **extra})
