"""GPUWarmupManager on the CPU: the device warm-up path and model warm-up on tiny random models."""

from __future__ import annotations

import json

import pytest

from gpufleet.gpu.config import WarmupConfig, WarmupOp, WarmupSize
from gpufleet.gpu.errors import ConfigError, ForwardError
from gpufleet.gpu.runtime.loader import PretrainedLoader
from gpufleet.gpu.runtime.model import LoadedModel, ModelKind
from gpufleet.gpu.runtime.warmup import GPUWarmupManager, WarmupReport
from gpufleet.workers.tools.checkpoints import make_checkpoint


def test_cpu_warm_up_runs_every_configured_op() -> None:
    """Every configured operation runs: the matrix kernels once per served dtype, one convolution (the library
    loads once; float32 on the CPU), then the memory step, in that order, none skipped and each timed."""
    manager = GPUWarmupManager("cpu", WarmupConfig(), dtypes=("float32", "bfloat16"))
    assert not manager.is_warm
    report = manager.warm_up()
    assert manager.is_warm
    assert isinstance(report, WarmupReport)
    assert report.device == "cpu" and report.size == "medium" and report.skipped is None
    ops = [(step.op, step.detail.split()[0]) for step in report.steps]
    assert ops[0][0] == "context"
    for dtype in ("float32", "bfloat16"):
        for op in ("matmul", "linear", "attention"):
            assert (op, dtype) in ops
    assert [op for op in ops if op[0] == "conv2d"] == [("conv2d", "float32")]
    assert ops[-1][0] == "memory" and [op for op, _ in ops].count("memory") == 1
    expected = 1 + 3 * 2 + 1 + 1  # context, three matrix kernels per dtype, conv2d, memory
    assert len(report.steps) == expected
    assert all(step.skipped is None and step.seconds >= 0 for step in report.steps)
    assert all(step.seconds >= 0 and step.skipped is None for step in report.steps)
    assert report.total_s >= sum(step.seconds for step in report.steps)
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data


def test_only_configured_operations_run() -> None:
    config = WarmupConfig(operations=(WarmupOp.MEMORY,), size=WarmupSize.LARGE)
    report = GPUWarmupManager("cpu", config).warm_up()
    assert [step.op for step in report.steps] == ["context", "memory"]
    assert report.size == "large"
    assert "8 MiB" in report.steps[1].detail  # CPU shapes stay small whatever the size


def test_disabled_warm_up_is_skipped_with_a_reason() -> None:
    manager = GPUWarmupManager("cpu", WarmupConfig(enabled=False))
    report = manager.warm_up()
    assert report.skipped is not None and "disabled" in report.skipped
    assert report.steps == () and report.total_s == 0.0
    assert not manager.is_warm


def test_invalid_device_and_dtype() -> None:
    with pytest.raises(ConfigError, match="mps"):
        GPUWarmupManager("mps", WarmupConfig())
    with pytest.raises(ConfigError, match="int8"):
        GPUWarmupManager("cpu", WarmupConfig(), dtypes=("int8",))
    with pytest.raises(ConfigError):
        GPUWarmupManager("cpu", WarmupConfig(), dtypes=())


def test_cuda_without_cuda_is_a_clear_error() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="--cpu"):
        GPUWarmupManager("cuda", WarmupConfig()).warm_up()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = make_checkpoint(tmp_path_factory.mktemp("llama") / "tiny-llama", "llama")
    return PretrainedLoader().load("test/tiny-llama", path, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = make_checkpoint(tmp_path_factory.mktemp("bert") / "tiny-bert", "bert")
    return PretrainedLoader().load("test/tiny-bert", path, device="cpu", dtype="float32")


def test_warm_model_causal_lm(tiny_llama: LoadedModel) -> None:
    assert tiny_llama.kind is ModelKind.CAUSAL_LM
    manager = GPUWarmupManager("cpu", WarmupConfig(), dtypes=("float32",))
    seconds = manager.warm_model(tiny_llama)
    assert seconds > 0
    assert tiny_llama.extra["warm_s"] == seconds  # left on the model for status reports


def test_warm_model_embedding(tiny_bert: LoadedModel) -> None:
    assert tiny_bert.kind is ModelKind.EMBEDDING
    manager = GPUWarmupManager("cpu", WarmupConfig(), dtypes=("float32",))
    assert manager.warm_model(tiny_bert) > 0


def test_warm_model_failure_is_an_inference_error(tiny_bert: LoadedModel) -> None:
    class Broken:
        def __call__(self, *args: object, **kwargs: object) -> object:
            raise RuntimeError("shape mismatch in layer 3")

    broken = LoadedModel(
        model_id="test/broken",
        path=tiny_bert.path,
        kind=ModelKind.EMBEDDING,
        module=Broken(),
        tokenizer=tiny_bert.tokenizer,
        device="cpu",
        dtype="float32",
        bytes=0,
        loader="test",
    )
    manager = GPUWarmupManager("cpu", WarmupConfig(), dtypes=("float32",))
    with pytest.raises(ForwardError, match=r"test/broken.*shape mismatch"):
        manager.warm_model(broken)


def test_imports_without_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import gpufleet.gpu.runtime.warmup, gpufleet.gpu.runtime.memory_pool; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.stdout.strip() == "ok", result.stderr
