"""Failures inside a real model's forward leave gpu.runtime translated where they happen.

Real tiny models on the CPU (the demo MiniLM embedder, a random-weight Llama); a hook on the real module raises
what torch raises when the device is full (``torch.OutOfMemoryError``) or when a forward fails. embed, generate
and warm_model must turn the first into DeviceOutOfMemoryError and the rest into ForwardError, pass our own
errors through, and answer normally once the hook is gone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from gpufleet.gpu.config import WarmupConfig
from gpufleet.gpu.errors import ConfigError, DeviceOutOfMemoryError, ForwardError, GpuError, LoadFailedError
from gpufleet.gpu.runtime.inference import embed, generate
from gpufleet.gpu.runtime.loader import FastSafetensorsLoader
from gpufleet.gpu.runtime.model import LoadedModel, ModelKind
from gpufleet.gpu.runtime.oom import inject_forward_error, inject_oom_on_forward, is_oom
from gpufleet.gpu.runtime.options import GenerateOptions
from gpufleet.gpu.runtime.warmup import GPUWarmupManager
from gpufleet.workers.tools.demo_models import DEMO_EMBEDDING_ID

OOM_MESSAGE = "CUDA out of memory. Tried to allocate 2.00 GiB"


@pytest.fixture(scope="module")
def minilm(minilm_dir: Path) -> LoadedModel:
    return FastSafetensorsLoader().load(DEMO_EMBEDDING_ID, minilm_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def llama(tiny_causal_lm_dir: Path) -> LoadedModel:
    return FastSafetensorsLoader().load("test/tiny-llama", tiny_causal_lm_dir, device="cpu", dtype="float32")


def run_embed(loaded: LoadedModel) -> object:
    return embed(loaded, ["the quick brown fox", "a second sentence"])


def run_generate(loaded: LoadedModel) -> object:
    return generate(loaded, GenerateOptions(prompt="hello there", max_new_tokens=3))


def run_warm_model(loaded: LoadedModel) -> object:
    return GPUWarmupManager("cpu", WarmupConfig(), dtypes=("float32",)).warm_model(loaded)


# (what runs, the model fixture it runs on)
CASES = [
    pytest.param(run_embed, "minilm", id="embed"),
    pytest.param(run_generate, "llama", id="generate"),
    pytest.param(run_warm_model, "minilm", id="warm_model-embedding"),
    pytest.param(run_warm_model, "llama", id="warm_model-causal-lm"),
]


def raising_forward_hook(error: BaseException) -> Callable[..., None]:
    """A forward hook (runs after the real forward) that raises ``error``."""

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        raise error

    return hook


def raising_pre_hook(error: BaseException) -> Callable[..., None]:
    """A forward pre-hook (runs before the real forward) that raises ``error``."""

    def hook(module: torch.nn.Module, args: Any) -> None:
        raise error

    return hook


def check_answers(run: Callable[[LoadedModel], object], loaded: LoadedModel) -> None:
    result = run(loaded)
    if loaded.kind is ModelKind.EMBEDDING and isinstance(result, list):
        assert len(result) == 2 and len(result[0]) == 384
    elif not isinstance(result, float):
        assert getattr(result, "completion_tokens", 0) >= 1
    else:
        assert result > 0


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(torch.OutOfMemoryError(OOM_MESSAGE), id="torch.OutOfMemoryError"),
        pytest.param(RuntimeError("CUDA error: out of memory"), id="RuntimeError-out-of-memory"),
    ],
)
@pytest.mark.parametrize(("run", "model"), CASES)
def test_device_oom_in_the_forward_is_translated(
    run: Callable[[LoadedModel], object], model: str, error: Exception, request: pytest.FixtureRequest
) -> None:
    loaded: LoadedModel = request.getfixturevalue(model)
    handle = loaded.module.register_forward_hook(raising_forward_hook(error))
    try:
        with pytest.raises(DeviceOutOfMemoryError) as info:
            run(loaded)
    finally:
        handle.remove()
    assert info.value.__cause__ is error
    message = str(info.value)
    assert loaded.model_id in message and "out of memory" in message
    assert "route the model to a GPU with more memory" in message  # says what to do
    check_answers(run, loaded)


@pytest.mark.parametrize(
    "error",
    [RuntimeError("boom"), ValueError("boom"), IndexError("boom"), TypeError("boom")],
    ids=lambda error: type(error).__name__,
)
@pytest.mark.parametrize(("run", "model"), CASES)
def test_library_errors_in_the_forward_are_inference_errors(
    run: Callable[[LoadedModel], object], model: str, error: Exception, request: pytest.FixtureRequest
) -> None:
    loaded: LoadedModel = request.getfixturevalue(model)
    handle = loaded.module.register_forward_pre_hook(raising_pre_hook(error))
    try:
        with pytest.raises(ForwardError) as info:
            run(loaded)
    finally:
        handle.remove()
    assert not isinstance(info.value, DeviceOutOfMemoryError)
    assert info.value.__cause__ is error
    message = str(info.value)
    assert loaded.model_id in message and f"{type(error).__name__}: boom" in message
    assert "unload the model" in message or "check its config.json" in message  # says what to do
    check_answers(run, loaded)


@pytest.mark.parametrize("error", [ForwardError("ours"), LoadFailedError("ours too")], ids=lambda e: type(e).__name__)
@pytest.mark.parametrize(("run", "model"), CASES)
def test_our_own_errors_pass_through_unchanged(
    run: Callable[[LoadedModel], object], model: str, error: GpuError, request: pytest.FixtureRequest
) -> None:
    loaded: LoadedModel = request.getfixturevalue(model)
    handle = loaded.module.register_forward_hook(raising_forward_hook(error))
    try:
        with pytest.raises(GpuError) as info:
            run(loaded)
    finally:
        handle.remove()
    assert info.value is error


def test_other_exceptions_are_not_hidden(minilm: LoadedModel) -> None:
    error = KeyError("not a failure of the model")
    handle = minilm.module.register_forward_hook(raising_forward_hook(error))
    try:
        with pytest.raises(KeyError) as info:
            run_embed(minilm)
    finally:
        handle.remove()
    assert info.value is error


# -------------------------------------------------------------------------------------------- the injector


def test_inject_oom_fails_the_next_calls_then_disarms(llama: LoadedModel) -> None:
    hooks_before = len(llama.module._forward_pre_hooks)
    inject_oom_on_forward(llama.module, calls=2)
    # Each failing generate stops at its first forward, so two generations fail and the third answers.
    for _ in range(2):
        with pytest.raises(DeviceOutOfMemoryError) as info:
            run_generate(llama)
        assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
        assert is_oom(info.value.__cause__)
    assert len(llama.module._forward_pre_hooks) == hooks_before  # the hook removed itself
    check_answers(run_generate, llama)


def test_injected_oom_surfaces_from_warm_model(minilm: LoadedModel) -> None:
    inject_oom_on_forward(minilm.module, calls=1)
    with pytest.raises(DeviceOutOfMemoryError, match="embedding 2 texts with 'sentence-transformers/all-MiniLM"):
        run_warm_model(minilm)
    check_answers(run_warm_model, minilm)


def test_removing_the_handle_disarms_early(minilm: LoadedModel) -> None:
    handle = inject_oom_on_forward(minilm.module, calls=5)
    with pytest.raises(DeviceOutOfMemoryError):
        run_embed(minilm)
    handle.remove()
    handle.remove()  # harmless twice
    check_answers(run_embed, minilm)


def test_inject_any_error(minilm: LoadedModel) -> None:
    inject_forward_error(minilm.module, lambda: RuntimeError("boom"), calls=1)
    with pytest.raises(ForwardError, match="RuntimeError: boom"):
        run_embed(minilm)
    check_answers(run_embed, minilm)


def test_calls_must_be_positive(minilm: LoadedModel) -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        inject_oom_on_forward(minilm.module, calls=0)
    assert len(minilm.module._forward_pre_hooks) == 0
