"""The OpenAI-compatible ``/v1`` endpoints of `gpufleet api`, called with the official ``openai`` client (sync and
async) and with httpx for raw Server-Sent Events, over a real CPU worker serving real models."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.workers.tools.launch import stop_process, tail
from tests.integration.conftest import RunningWorker, WorkerFactory
from tests.integration.test_api import Api, start_api

pytestmark = pytest.mark.integration

EMBED = "sentence-transformers/all-MiniLM-L6-v2"
CHAT = "gpufleet/tiny-chat"
HUGE = "org/huge-70b"  # installed (a config only) where the API looks, too big for any live worker
ALICE = "alice-key-0123456789abcdef"
LIMITED = "limited-key-0123456789abcdef"
METERED = "metered-key-0123456789abcdef"
TOKEN = "v1-integration-token"
KEYS = [
    {"name": "alice", "key": ALICE},
    {"name": "limited", "key": LIMITED, "models": [CHAT]},
    {"name": "metered", "key": METERED, "requests_per_minute": 3},
]
HUGE_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "torch_dtype": "bfloat16",
}


@dataclass
class V1:
    api: Api
    worker: RunningWorker

    @property
    def url(self) -> str:
        return self.api.base + "/v1"

    def client(self, key: str = ALICE) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=120.0)

    def async_client(self, key: str = ALICE) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=120.0)


def api_model_root(model_root: Path, target: Path) -> Path:
    """The API's own view of the models: the worker's two (hard links) and a 70B config no worker can hold."""
    for model in (EMBED, CHAT):
        shutil.copytree(model_root / model, target / model, copy_function=os.link)
    (target / HUGE).mkdir(parents=True)
    (target / HUGE / "config.json").write_text(json.dumps(HUGE_CONFIG))
    return target


@pytest.fixture(scope="module")
def v1(
    module_worker_factory: WorkerFactory, model_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[V1]:
    worker = module_worker_factory()
    logs = tmp_path_factory.mktemp("v1")
    env = {
        **worker.env,
        "GPUFLEET_MODEL_ROOT": str(api_model_root(model_root, logs / "models")),
        "GPUFLEET_API__TOKEN": TOKEN,
        "GPUFLEET_API__KEYS": json.dumps(KEYS),
    }
    api = start_api(env, logs / "api.log")
    try:
        worker.client.load_model(CHAT).get(timeout=180)
        worker.client.embed(EMBED, ["warm"]).get(timeout=180)
        yield V1(api, worker)
    finally:
        stop_process(api.process)


def test_models_lists_installed_and_held_models(v1: V1) -> None:
    listed = {model.id: model for model in v1.client().models.list()}
    assert {EMBED, CHAT, HUGE} <= set(listed)
    assert listed[EMBED].object == "model" and listed[EMBED].owned_by == "sentence-transformers"
    assert listed[EMBED].created > 0
    assert v1.client().models.retrieve(CHAT).id == CHAT
    with pytest.raises(openai.NotFoundError, match="GET /v1/models"):
        v1.client().models.retrieve("org/none")
    # A key limited to some models sees only those.
    assert [model.id for model in v1.client(LIMITED).models.list()] == [CHAT]


def test_embeddings_float_and_base64_agree(v1: V1) -> None:
    texts = ["The cat sat on the mat.", "A dog ran in the park."]
    floats = v1.client().embeddings.create(model=EMBED, input=texts, encoding_format="float")
    assert [item.index for item in floats.data] == [0, 1]
    assert all(len(item.embedding) == 384 for item in floats.data)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > len(texts) * 2
    # The client asks for base64 by default and decodes it itself.
    decoded = v1.client().embeddings.create(model=EMBED, input=texts)
    for a, b in zip(floats.data, decoded.data, strict=True):
        assert max(abs(x - y) for x, y in zip(a.embedding, b.embedding, strict=True)) < 1e-6
    raw = httpx.post(
        v1.url + "/embeddings",
        json={"model": EMBED, "input": "one text", "encoding_format": "base64"},
        headers={"Authorization": f"Bearer {ALICE}"},
        timeout=60,
    )
    packed = base64.b64decode(raw.json()["data"][0]["embedding"])
    vector = struct.unpack(f"<{len(packed) // 4}f", packed)
    assert len(vector) == 384 and abs(sum(x * x for x in vector) - 1.0) < 1e-4  # normalized float32
    assert raw.headers["x-gpufleet-worker"] == v1.worker.name
    assert raw.json()["gpufleet"]["job_id"] == raw.headers["x-gpufleet-job-id"]


def test_concurrent_embeddings_each_get_their_own_vectors(v1: V1) -> None:
    """Requests sent at once may share a job (the coalescer): each still gets exactly its own answer."""
    texts = [f"sentence {i}: {'many ' * i}words" for i in range(12)]
    alone = [v1.client().embeddings.create(model=EMBED, input=text, encoding_format="float") for text in texts]

    async def together() -> list[Any]:
        client = v1.async_client()
        answers = await asyncio.gather(
            *(client.embeddings.create(model=EMBED, input=t, encoding_format="float") for t in texts)
        )
        await client.close()
        return list(answers)

    for one, other in zip(alone, asyncio.run(together()), strict=True):
        assert len(other.data) == 1 and other.usage.prompt_tokens == one.usage.prompt_tokens
        assert max(abs(x - y) for x, y in zip(one.data[0].embedding, other.data[0].embedding, strict=True)) < 1e-5


def test_chat_streamed_text_equals_the_whole_answer(v1: V1) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me about the sea."},
    ]
    whole = v1.client().chat.completions.create(model=CHAT, messages=messages, max_tokens=24, temperature=0)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert whole.usage is not None and whole.usage.completion_tokens >= 1 and whole.usage.prompt_tokens > 5
    assert whole.id.startswith("chatcmpl-")
    chunks = list(
        v1.client().chat.completions.create(
            model=CHAT,
            messages=messages,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_completions_with_and_without_streaming(v1: V1) -> None:
    client = v1.client()
    prompts = ["Once upon a time", "The weather"]
    both = client.completions.create(model=CHAT, prompt=prompts, max_tokens=8, temperature=0)
    assert [c.index for c in both.choices] == [0, 1]
    alone = [client.completions.create(model=CHAT, prompt=p, max_tokens=8, temperature=0) for p in prompts]
    assert [c.choices[0].text for c in alone] == [c.text for c in both.choices]  # each prompt its own job
    assert both.usage is not None and alone[0].usage is not None and alone[1].usage is not None
    assert both.usage.completion_tokens == alone[0].usage.completion_tokens + alone[1].usage.completion_tokens
    assert both.usage.prompt_tokens == alone[0].usage.prompt_tokens + alone[1].usage.prompt_tokens > 0
    streamed = client.completions.create(model=CHAT, prompt=prompts[0], max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == alone[0].choices[0].text


def test_the_async_client_runs_many_requests_at_once(v1: V1) -> None:
    async def main() -> list[str]:
        client = v1.async_client()
        answers = await asyncio.gather(
            *(client.embeddings.create(model=EMBED, input=f"sentence number {i}") for i in range(24)),
            *(
                client.chat.completions.create(
                    model=CHAT, messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=4, temperature=0
                )
                for i in range(6)
            ),
        )
        await client.close()
        return [type(answer).__name__ for answer in answers]

    assert asyncio.run(main()) == ["CreateEmbeddingResponse"] * 24 + ["ChatCompletion"] * 6


def test_raw_sse_with_httpx(v1: V1) -> None:
    events: list[str] = []
    with httpx.stream(
        "POST",
        v1.url + "/chat/completions",
        json={"model": CHAT, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "stream": True},
        headers={"Authorization": f"Bearer {TOKEN}"},  # GPUFLEET_API__TOKEN is a key too
        timeout=60,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-gpufleet-job-id"]
        for line in response.iter_lines():
            if line:
                assert line.startswith("data: ")
                events.append(line.removeprefix("data: "))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["gpufleet"]["worker"] == v1.worker.name


def test_a_client_that_leaves_a_stream_cancels_its_job(v1: V1) -> None:
    with httpx.stream(
        "POST",
        v1.url + "/completions",
        json={"model": CHAT, "prompt": "once upon a time", "max_tokens": 2000, "stream": True, "temperature": 0},
        headers={"Authorization": f"Bearer {ALICE}"},
        timeout=60,
    ) as response:
        assert response.status_code == 200, response.read()
        job_id = response.headers["x-gpufleet-job-id"]
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # the first delta: the job is generating
    result = v1.worker.client.app.AsyncResult(job_id)
    deadline = time.monotonic() + 30
    while result.state != "REVOKED" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert result.state == "REVOKED", tail(v1.api.log_path)


def test_errors_arrive_as_the_clients_own_exceptions(v1: V1) -> None:
    client = v1.client()
    chat: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError, match="matches none"):
        v1.client("wrong-key-0123456789").models.list()
    missing = httpx.get(v1.url + "/models", timeout=10)  # the openai client always sends a key
    assert missing.status_code == 401 and "needs an API key" in missing.json()["error"]["message"]
    assert missing.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.PermissionDeniedError, match="may not use model"):
        v1.client(LIMITED).embeddings.create(model=EMBED, input="x")
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model=CHAT, messages=chat, n=2)
    with pytest.raises(openai.BadRequestError, match="token-id input"):
        client.embeddings.create(model=EMBED, input=[[1, 2, 3]])
    with pytest.raises(openai.BadRequestError, match="context of"):
        client.chat.completions.create(model=CHAT, messages=chat, max_tokens=100_000)
    with pytest.raises(openai.NotFoundError, match="'org/not-installed' is not installed on this fleet") as unknown:
        client.embeddings.create(model="org/not-installed", input="x")
    assert "/tmp" not in unknown.value.message  # the fleet's directories stay in its log
    with pytest.raises(openai.InternalServerError) as unavailable:
        client.chat.completions.create(model=HUGE, messages=chat, max_tokens=4)
    assert unavailable.value.status_code == 503
    with pytest.raises(openai.APIStatusError) as too_large:
        client.embeddings.create(model=EMBED, input=["x" * 90_000] * 60)
    assert too_large.value.status_code == 413


def test_a_key_over_its_rate_limit_gets_429_with_retry_after(v1: V1) -> None:
    client = v1.client(METERED)
    for _ in range(3):
        client.models.list()
    with pytest.raises(openai.RateLimitError, match="requests a minute") as limited:
        client.models.list()
    assert int(limited.value.response.headers["retry-after"]) >= 1


def test_usage_is_counted_per_key_in_metrics(v1: V1) -> None:
    v1.client().embeddings.create(model=EMBED, input="count me")
    scraped = httpx.get(v1.api.base + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).text
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(scraped)
        for s in family.samples
    }
    requests = (
        "gpufleet_api_requests_total",
        frozenset({"key": "alice", "endpoint": "embeddings", "code": "200"}.items()),
    )
    assert samples[requests] >= 1
    assert samples["gpufleet_api_prompt_tokens_total", frozenset({"key": "alice", "model": EMBED}.items())] >= 4


def test_timeout_and_backpressure(v1: V1, tmp_path: Path) -> None:
    """A second API with a 0.3 s request timeout and room for 2 jobs a model: 504 for a long job, 429 past 2."""
    env = {
        **v1.worker.env,
        "GPUFLEET_API__REQUEST_TIMEOUT_S": "0.3",
        "GPUFLEET_API__MAX_PENDING_PER_MODEL": "2",
    }
    api = start_api(env, tmp_path / "api.log")
    try:
        client = openai.OpenAI(base_url=api.base + "/v1", api_key="none", max_retries=0, timeout=60)
        with pytest.raises(openai.InternalServerError, match="request timeout") as timed_out:
            # Greedy from this prompt runs its whole 2000 tokens (test_generation relies on it too): seconds.
            client.completions.create(model=CHAT, prompt="once upon a time", max_tokens=2000, temperature=0)
        assert timed_out.value.status_code == 504

        async def crowd() -> list[int]:
            async with httpx.AsyncClient(base_url=api.base, timeout=60) as http:
                answers = await asyncio.gather(
                    *(
                        http.post(
                            "/v1/completions",
                            json={"model": CHAT, "prompt": "once upon a time", "max_tokens": 400, "temperature": 0},
                        )
                        for _ in range(6)
                    )
                )
            return [answer.status_code for answer in answers]

        codes = asyncio.run(crowd())
        # Two are admitted (each answered, or 504 past the 0.3 s timeout); the others arrive while they wait.
        assert codes.count(429) >= 3 and set(codes) <= {200, 429, 504}, codes
    finally:
        stop_process(api.process)
