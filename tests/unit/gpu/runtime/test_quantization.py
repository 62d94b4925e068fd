"""Quantized checkpoints are refused from config.json alone, before any weight file is opened."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpufleet.gpu.errors import LoadFailedError, UnsupportedQuantizationError
from gpufleet.gpu.runtime.loader import FastSafetensorsLoader, PretrainedLoader
from gpufleet.gpu.runtime.quantization import QUANT_REQUIREMENTS, check_quantized, quant_method

QUANT_CONFIGS: dict[str, dict[str, Any]] = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"},
    "bitsandbytes": {"quant_method": "bitsandbytes", "load_in_4bit": True},
    "fp8": {"quant_method": "fp8", "weight_block_size": [128, 128]},
    "compressed-tensors": {"quant_method": "compressed-tensors", "format": "float-quantized"},
    "mxfp4": {"quant_method": "mxfp4"},
}

_opened: list[str] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and isinstance(args[0], str) and args[0].endswith(".safetensors"):
        _opened.append(args[0])


sys.addaudithook(_audit)  # audit hooks cannot be removed: this one only records weight files opened


@pytest.fixture
def opened() -> Iterator[list[str]]:
    _opened.clear()
    yield _opened
    _opened.clear()


def _quantized_dir(tmp_path: Path, method: str) -> Path:
    """A config-only quantized Llama whose weights file is garbage: reading it would fail differently."""
    path = tmp_path / method
    path.mkdir()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "vocab_size": 100,
        "quantization_config": QUANT_CONFIGS[method],
    }
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"\xff" * 64)
    return path


@pytest.mark.parametrize("method", list(QUANT_CONFIGS))
@pytest.mark.parametrize("loader", [FastSafetensorsLoader, PretrainedLoader])
def test_cpu_refuses_every_quantized_checkpoint_before_reading_weights(
    method: str, loader: type[Any], tmp_path: Path, opened: list[str]
) -> None:
    path = _quantized_dir(tmp_path, method)
    opened.clear()  # writing the garbage weights opened the file: count from the load on
    with pytest.raises(UnsupportedQuantizationError, match=rf"{method}-quantized.*need CUDA kernels.*cpu") as info:
        loader().load("org/q", path, device="cpu", dtype="float32")
    assert isinstance(info.value, LoadFailedError)  # the task layer maps it to the job's LoadFailedError
    assert opened == [], "no weight file may be opened before the refusal"


def test_old_gpu_is_refused_naming_the_capability(tmp_path: Path) -> None:
    path = _quantized_dir(tmp_path, "fp8")
    with pytest.raises(UnsupportedQuantizationError, match=r"compute capability 8\.9 or later and cuda:0 has 8\.0"):
        check_quantized("org/q", path, "cuda:0", capability=lambda _: (8, 0), has_module=lambda _: True)


@pytest.mark.parametrize(
    ("method", "missing"),
    [
        ("gptq", r"optimum, gptqmodel.*gpufleet\[quant-gptq\]"),
        ("awq", r"gptqmodel or autoawq.*gpufleet\[quant-awq\]"),
        ("bitsandbytes", r"lacks bitsandbytes.*gpufleet\[quant-bnb\]"),
        ("compressed-tensors", r"lacks compressed-tensors.*gpufleet\[quant-ct\]"),
    ],
)
def test_missing_kernel_package_is_named_with_its_extra(method: str, missing: str, tmp_path: Path) -> None:
    path = _quantized_dir(tmp_path, method)
    with pytest.raises(UnsupportedQuantizationError, match=missing):
        check_quantized("org/q", path, "cuda:0", capability=lambda _: (9, 0), has_module=lambda _: False)


def test_a_capable_gpu_with_its_packages_passes(tmp_path: Path) -> None:
    for method in QUANT_CONFIGS:
        path = _quantized_dir(tmp_path, method)
        assert check_quantized("org/q", path, "cuda:0", capability=lambda _: (9, 0), has_module=lambda _: True) == (
            method
        )
    # Only one of AWQ's alternatives is needed.
    awq = tmp_path / "awq"
    assert check_quantized("o/q", awq, "cuda:0", capability=lambda _: (9, 0), has_module=lambda m: m == "awq")


def test_unquantized_and_gguf_directories_pass(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert quant_method(plain) is None
    assert check_quantized("org/p", plain, "cpu") is None
    assert check_quantized("org/g", tmp_path, "cpu") is None  # no config.json: nothing to refuse


def test_nested_text_config_quantization_is_found(tmp_path: Path) -> None:
    path = tmp_path / "mm"
    path.mkdir()
    config = {"model_type": "gemma3", "text_config": {"quantization_config": {"quant_method": "bitsandbytes"}}}
    (path / "config.json").write_text(json.dumps(config))
    assert quant_method(path) == "bitsandbytes"


def test_every_requirement_names_an_extra_or_a_package() -> None:
    for requirement in QUANT_REQUIREMENTS.values():
        assert requirement.extra or requirement.modules or requirement.method == "fp8"
        assert (7, 0) <= requirement.min_capability <= (9, 0)
