"""Batched inference answers each job as if it ran alone (real MiniLM, a real random-weight Llama, on the CPU)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from gpufleet.gpu.errors import ForwardError
from gpufleet.gpu.runtime.batching import (
    MIN_CHUNK_ROWS,
    EmbedJob,
    _length_chunks,
    embed_batch,
    encode_prompt,
    generate_batch,
)
from gpufleet.gpu.runtime.inference import embed, generate
from gpufleet.gpu.runtime.loader import FastSafetensorsLoader
from gpufleet.gpu.runtime.model import LoadedModel
from gpufleet.gpu.runtime.options import GenerateOptions
from gpufleet.workers.tools.demo_models import DEMO_EMBEDDING_ID

SENTENCES = [
    "the quick brown fox",
    "a much longer sentence that has quite a few more tokens than the others in this batch",
    "hi",
    "GPU fleets serve many models",
    "batching several jobs into one forward",
]
PROMPTS = ["hello there", "once upon a time in a land far away", "the answer is", "a"]


@pytest.fixture(scope="module")
def minilm(minilm_dir: Path) -> LoadedModel:
    return FastSafetensorsLoader().load(DEMO_EMBEDDING_ID, minilm_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def llama(tiny_causal_lm_dir: Path) -> LoadedModel:
    return FastSafetensorsLoader().load("test/tiny-llama", tiny_causal_lm_dir, device="cpu", dtype="float32")


def assert_close(a: list[list[float]], b: list[list[float]], tolerance: float = 1e-5) -> None:
    assert len(a) == len(b)
    for row_a, row_b in zip(a, b, strict=True):
        assert max(abs(x - y) for x, y in zip(row_a, row_b, strict=True)) < tolerance


@pytest.mark.parametrize("max_batch_tokens", [16384, 40, 1])
def test_embed_batch_equals_each_job_alone(minilm: LoadedModel, max_batch_tokens: int) -> None:
    jobs = [EmbedJob(SENTENCES[:2]), EmbedJob(SENTENCES[2:3], normalize=False), EmbedJob(SENTENCES[3:])]
    batched = embed_batch(minilm, jobs, max_batch_tokens=max_batch_tokens)
    assert [len(answer.vectors) for answer in batched] == [2, 1, 2]
    for job, answer in zip(jobs, batched, strict=True):
        assert_close(answer.vectors, embed(minilm, list(job.texts), normalize=job.normalize))
        # What the job's own texts tokenize to, [CLS] and [SEP] included, whatever it was batched with.
        assert answer.text_tokens == [len(ids) for ids in minilm.tokenizer(list(job.texts))["input_ids"]]


def test_packed_vectors_are_the_float32_values(minilm: LoadedModel) -> None:
    floats, packed = embed_batch(minilm, [EmbedJob(SENTENCES[:3]), EmbedJob(SENTENCES[:3], packed=True)])
    assert floats.packed == [] and packed.vectors == [] and packed.text_tokens == floats.text_tokens
    for vector, raw in zip(floats.vectors, packed.packed, strict=True):
        assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == vector  # exact: both are the float32 values


def test_length_chunks_respect_the_token_budget() -> None:
    lengths = [5, 30, 2, 7, 7, 12]
    chunks = _length_chunks(lengths, max_batch_tokens=24)
    assert sorted(i for chunk in chunks for i in chunk) == list(range(len(lengths)))
    for chunk in chunks:
        assert len(chunk) == 1 or len(chunk) * max(lengths[i] for i in chunk) <= 24
    assert [1] in chunks  # the one text over the budget runs alone


def test_length_chunks_keep_padding_low_once_a_forward_is_large_enough() -> None:
    lengths = [9 + (i % 9) for i in range(256)]  # one-sentence texts: 9 to 17 tokens
    chunks = _length_chunks(lengths, max_batch_tokens=16384)
    assert sorted(i for chunk in chunks for i in chunk) == list(range(256))
    padded = sum(len(chunk) * max(lengths[i] for i in chunk) for chunk in chunks)
    assert padded <= 1.15 * sum(lengths)  # one forward padded to 17 would be 1.31x
    assert all(len(chunk) >= MIN_CHUNK_ROWS for chunk in chunks[:-1])  # never tiny forwards for it
    # Few texts stay in one forward whatever their spread: splitting them would cost more than the padding.
    assert _length_chunks([3, 40, 9], max_batch_tokens=16384) == [[0, 2, 1]]


def test_embed_batch_refuses_a_causal_lm(llama: LoadedModel) -> None:
    with pytest.raises(ForwardError, match=r"fleet\.generate"):
        embed_batch(llama, [EmbedJob(["x"])])


def test_greedy_batch_is_token_identical_to_each_prompt_alone(llama: LoadedModel) -> None:
    jobs = [GenerateOptions(prompt=p, max_new_tokens=n) for p, n in zip(PROMPTS, (12, 5, 20, 1), strict=True)]
    batched = generate_batch(llama, [encode_prompt(llama, job) for job in jobs])
    for job, result in zip(jobs, batched, strict=True):
        alone = generate(llama, GenerateOptions(prompt=job.prompt, max_new_tokens=job.max_new_tokens))
        assert result == alone
        assert result.completion_tokens <= job.max_new_tokens


def test_seeded_sampling_does_not_depend_on_the_batch(llama: LoadedModel) -> None:
    sampled = GenerateOptions(prompt="hello there", max_new_tokens=10, temperature=0.8, top_p=0.9, seed=7)
    others = [GenerateOptions(prompt=p, max_new_tokens=8) for p in PROMPTS[1:]]
    alone = generate_batch(llama, [encode_prompt(llama, sampled)])[0]
    in_batch = generate_batch(llama, [encode_prompt(llama, job) for job in [*others, sampled]])[-1]
    assert alone == in_batch
    other_seed = GenerateOptions(prompt="hello there", max_new_tokens=10, temperature=0.8, top_p=0.9, seed=8)
    assert generate_batch(llama, [encode_prompt(llama, other_seed)])[0].text != alone.text


def test_a_prompt_over_the_context_is_refused_before_batching(llama: LoadedModel) -> None:
    context = llama.module.config.max_position_embeddings
    with pytest.raises(ForwardError, match="exceeds the model's context"):
        encode_prompt(llama, GenerateOptions(prompt="hello", max_new_tokens=context))


def test_messages_need_a_chat_template_or_are_refused(llama: LoadedModel) -> None:
    job = GenerateOptions(messages=[{"role": "user", "content": "hi"}], max_new_tokens=4)
    if getattr(llama.tokenizer, "chat_template", None):
        (result,) = generate_batch(llama, [encode_prompt(llama, job)])
        assert result.prompt_tokens > 0
    else:
        with pytest.raises(ForwardError, match="chat template"):
            encode_prompt(llama, job)
