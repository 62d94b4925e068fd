"""The decode loop on a real (tiny, random-weight) Llama: same tokens as generate alone, joins, stops, cancels."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.gpu.runtime.batching import encode_prompt, generate_batch
from gpufleet.gpu.runtime.continuous import (
    DecodeLoop,
    LoopEvent,
    SequenceCancelled,
    SequenceDone,
    SequenceRequest,
    TextDelta,
    unsupported_reason,
)
from gpufleet.gpu.runtime.loader import FastSafetensorsLoader
from gpufleet.gpu.runtime.model import Generation, LoadedModel
from gpufleet.gpu.runtime.options import GenerateOptions

PROMPTS = ["once upon a time", "the queue holds", "a GPU fleet serves many models and", "hello"]


@pytest.fixture(scope="module")
def llama(tiny_causal_lm_dir: Path) -> LoadedModel:
    return FastSafetensorsLoader().load("test/tiny-llama", tiny_causal_lm_dir, device="cpu", dtype="float32")


def alone(loaded: LoadedModel, options: GenerateOptions) -> Generation:
    return generate_batch(loaded, [encode_prompt(loaded, options)])[0]


def request(loaded: LoadedModel, key: str, options: GenerateOptions, *, stream: bool = False) -> SequenceRequest:
    return SequenceRequest(key, encode_prompt(loaded, options).input_ids, options, stream=stream)


def run(loop: DecodeLoop, *, steps: int = 10_000) -> list[LoopEvent]:
    events: list[LoopEvent] = []
    for _ in range(steps):
        if loop.idle:
            break
        events += loop.step()
    return events


def done(events: list[LoopEvent]) -> dict[str, Generation]:
    return {event.key: event.generation for event in events if isinstance(event, SequenceDone)}


def test_the_tiny_llama_runs_in_the_loop(llama: LoadedModel) -> None:
    assert unsupported_reason(llama) is None


def test_greedy_sequences_equal_generate_alone_whatever_joins_when(llama: LoadedModel) -> None:
    options = [GenerateOptions(prompt=p, max_new_tokens=3 + 5 * i) for i, p in enumerate(PROMPTS)]
    expected = {f"job{i}": alone(llama, o) for i, o in enumerate(options)}
    loop = DecodeLoop(llama)
    loop.add(request(llama, "job0", options[0]))
    loop.add(request(llama, "job1", options[1]))
    events = loop.step() + loop.step()  # two running; the next ones join a loop that is mid-generation
    loop.add(request(llama, "job2", options[2]))
    events += loop.step()
    loop.add(request(llama, "job3", options[3]))
    events += run(loop)
    got = done(events)
    assert got.keys() == expected.keys()
    for key, generation in expected.items():
        assert got[key].text == generation.text, key
        assert got[key].completion_tokens == generation.completion_tokens
        assert got[key].finish_reason == generation.finish_reason


def test_short_sequences_finish_first_and_leave(llama: LoadedModel) -> None:
    loop = DecodeLoop(llama)
    loop.add(request(llama, "long", GenerateOptions(prompt="once upon a time", max_new_tokens=40)))
    loop.add(request(llama, "short", GenerateOptions(prompt="hello", max_new_tokens=2)))
    order = [event.key for event in run(loop) if isinstance(event, SequenceDone)]
    assert order == ["short", "long"]


def test_seeded_sampling_is_the_same_alone_and_in_company(llama: LoadedModel) -> None:
    sampled = GenerateOptions(prompt="the queue holds", max_new_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    solo = DecodeLoop(llama)
    solo.add(request(llama, "s", sampled))
    alone_text = done(run(solo))["s"].text
    company = DecodeLoop(llama)
    company.add(request(llama, "g", GenerateOptions(prompt="hello", max_new_tokens=20)))
    company.step()
    company.add(request(llama, "s", sampled))
    company.add(request(llama, "t", GenerateOptions(prompt="other", max_new_tokens=6, temperature=1.2, seed=1)))
    assert done(run(company))["s"].text == alone_text
    assert alone(llama, sampled).text == alone_text  # and the static path draws the same


def test_streamed_deltas_concatenate_to_the_final_text(llama: LoadedModel) -> None:
    loop = DecodeLoop(llama)
    loop.add(request(llama, "s", GenerateOptions(prompt="once upon a time", max_new_tokens=30), stream=True))
    events = run(loop)
    text = "".join(event.text for event in events if isinstance(event, TextDelta))
    assert sum(isinstance(event, TextDelta) for event in events) > 1
    assert text == done(events)["s"].text


def test_a_stop_string_ends_the_sequence_before_it(llama: LoadedModel) -> None:
    full = alone(llama, GenerateOptions(prompt="once upon a time", max_new_tokens=30)).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), "the model's text has something to stop at"
    loop = DecodeLoop(llama)
    options = GenerateOptions(prompt="once upon a time", max_new_tokens=30, stop=(stop,))
    loop.add(request(llama, "s", options, stream=True))
    events = run(loop)
    generation = done(events)["s"]
    assert generation.finish_reason == "stop"
    assert generation.text == full[: full.index(stop)]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == generation.text
    static = alone(llama, options)
    assert (static.text, static.finish_reason, static.completion_tokens) == (
        generation.text,
        "stop",
        generation.completion_tokens,
    )


def test_a_cancelled_sequence_leaves_and_the_others_finish_unchanged(llama: LoadedModel) -> None:
    keep = GenerateOptions(prompt="a GPU fleet serves many models and", max_new_tokens=25)
    loop = DecodeLoop(llama)
    loop.add(request(llama, "keep", keep))
    loop.add(request(llama, "drop", GenerateOptions(prompt="once upon a time", max_new_tokens=200)))
    for _ in range(3):
        loop.step()
    cancelled = loop.cancel("drop", "revoked")
    # A step that prefills ends there (its first token out at once); each later step decodes one more.
    assert isinstance(cancelled, SequenceCancelled) and cancelled.completion_tokens == 3
    events = run(loop)
    assert loop.steps <= 25 + 1
    assert done(events) == {"keep": alone(llama, keep)}
    assert loop.cancel("drop", "revoked") is None


def test_the_kv_budget_bounds_how_many_run_together(llama: LoadedModel) -> None:
    options = GenerateOptions(prompt="hello", max_new_tokens=10)
    prompt_len = len(encode_prompt(llama, options).input_ids)
    per_sequence = (prompt_len + 10) * DecodeLoop(llama).kv_bytes_per_token
    loop = DecodeLoop(llama, kv_budget_bytes=2 * per_sequence)
    for i in range(5):
        loop.add(request(llama, f"j{i}", options))
    loop.step()
    assert loop.running == 2 and len(loop.waiting) == 3
    assert len(done(run(loop))) == 5  # every one still finishes, two at a time


SYSTEM = "You are a helpful assistant of the GPU fleet. Answer briefly and kindly, in plain words, always. " * 2


def test_a_shared_prefix_is_computed_once_and_changes_no_token(llama: LoadedModel) -> None:
    options = [GenerateOptions(prompt=SYSTEM + q, max_new_tokens=8) for q in ("hello", "once upon", "a queue", "hi")]
    prompts = [encode_prompt(llama, o).input_ids for o in options]
    loop = DecodeLoop(llama)
    for i, o in enumerate(options[:3]):  # together: the shared prefix is computed once, first
        loop.add(request(llama, f"j{i}", o))
    events = run(loop)
    loop.add(request(llama, "j3", options[3]))  # later, alone: it reuses the last prompt's prefix
    events += run(loop)
    got = done(events)
    for i, o in enumerate(options):
        assert got[f"j{i}"].text == alone(llama, o).text
    assert loop.prefill_tokens < 0.5 * sum(len(p) for p in prompts)
    computed = {event.key: event.prefill_tokens for event in events if isinstance(event, SequenceDone)}
    assert computed["j3"] < len(prompts[3]) / 2
