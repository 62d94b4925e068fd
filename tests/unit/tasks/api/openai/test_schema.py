"""OpenAI request bodies and the fleet jobs they become; what is refused, with the field named."""

from __future__ import annotations

from typing import Any

import pytest

from gpufleet.tasks.api.openai.errors import OpenAIError
from gpufleet.tasks.api.openai.schema import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, parse
from gpufleet.tasks.contracts import GenerateRequest, validate_request

HI = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> ChatCompletionRequest:
    return parse(ChatCompletionRequest, {"model": "org/m", "messages": HI, **fields})


def refused(call: Any, param: str | None = None, match: str | None = None) -> OpenAIError:
    with pytest.raises(OpenAIError, match=match) as caught:
        call()
    assert caught.value.status == 400
    if param is not None:
        assert caught.value.param == param
    return caught.value


def test_a_chat_request_becomes_a_valid_generate_job() -> None:
    body = chat(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ],
        max_completion_tokens=20,
        max_tokens=5,
        temperature=0,
        top_p=0.9,
        seed=7,
        stop="END",
        stream=True,
        unknown_new_field=True,  # new client fields are ignored, not refused
    ).job_body(default_max_tokens=256)
    assert body == {
        "model": "org/m",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"}],
        "max_new_tokens": 20,  # max_completion_tokens wins over the older max_tokens
        "temperature": 0,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["END"],
        "stream": True,
    }
    validate_request(GenerateRequest, body)  # the job contract takes it as it is


def test_chat_defaults_are_openais() -> None:
    body = chat().job_body(default_max_tokens=99)
    assert (body["max_new_tokens"], body["temperature"], body["top_p"]) == (99, 1.0, 1.0)
    assert "stream" not in body and "stop" not in body


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"max_tokens": 5000}, "max_tokens"),
    ],
)
def test_unsupported_chat_options_are_refused_by_name(fields: dict[str, Any], param: str) -> None:
    refused(lambda: chat(**fields).job_body(default_max_tokens=16), param)


def test_malformed_bodies_name_the_field() -> None:
    error = refused(lambda: parse(ChatCompletionRequest, {"model": "org/m", "messages": HI, "temperature": 3}))
    assert error.param == "temperature"
    refused(lambda: parse(ChatCompletionRequest, {"model": "org/m"}), "messages")
    refused(lambda: parse(ChatCompletionRequest, ["not", "an", "object"]), match="JSON object")


def test_completion_prompts_are_one_job_each() -> None:
    body = parse(CompletionRequest, {"model": "org/m", "prompt": ["a", "b"], "max_tokens": 3})
    assert body.prompts() == ["a", "b"]
    assert body.job_body("b") == {
        "model": "org/m",
        "max_new_tokens": 3,
        "temperature": 1.0,
        "top_p": 1.0,
        "prompt": "b",
    }
    assert parse(CompletionRequest, {"model": "org/m", "prompt": "x"}).job_body("x")["max_new_tokens"] == 16
    for fields, param in (
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": ["a", "b"], "stream": True}, "prompt"),
        ({"prompt": " "}, "prompt"),
        ({"prompt": "a", "echo": True}, "echo"),
        ({"prompt": "a", "best_of": 3}, "best_of"),
    ):
        refused(lambda f=fields: parse(CompletionRequest, {"model": "org/m", **f}).prompts(), param)


def test_embedding_inputs() -> None:
    assert parse(EmbeddingRequest, {"model": "org/e", "input": "one"}).texts() == ["one"]
    body = parse(EmbeddingRequest, {"model": "org/e", "input": ["a", "b"], "encoding_format": "base64"})
    assert body.texts() == ["a", "b"] and body.encoding_format == "base64"
    for raw in ([1, 2], [[1, 2]], [], ["ok", "  "], ["x"] * 1025):
        refused(lambda r=raw: parse(EmbeddingRequest, {"model": "org/e", "input": r}).texts(), "input")
    refused(lambda: parse(EmbeddingRequest, {"model": "org/e", "input": "a", "dimensions": 8}).texts(), "dimensions")
    refused(lambda: parse(EmbeddingRequest, {"model": "org/e", "input": "a", "encoding_format": "int8"}))
