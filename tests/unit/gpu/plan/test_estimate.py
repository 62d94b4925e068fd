"""Memory estimates: weights (dtype- and quantization-aware), KV cache, activations and runtime overhead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gpufleet.gpu.errors import ConfigError
from gpufleet.gpu.plan.catalog import get_gpu_type
from gpufleet.gpu.plan.estimate import (
    GPU_RUNTIME_BYTES,
    estimate_activation_bytes,
    estimate_kv_cache_bytes,
    estimate_memory,
    estimate_weights_bytes,
)
from gpufleet.gpu.plan.specs import load_spec, spec_from_config, spec_from_name
from gpufleet.gpu.units import GB, GiB, dtype_bytes


def _quantized(llama_config: dict[str, Any], quantization_config: dict[str, Any]) -> int:
    return estimate_weights_bytes(spec_from_config({**llama_config, "quantization_config": quantization_config}))


def test_unquantized_weights_follow_the_dtype(llama_config: dict[str, Any]) -> None:
    spec = spec_from_config(llama_config)
    assert estimate_weights_bytes(spec) == spec.params * 2  # bfloat16 checkpoint
    assert estimate_weights_bytes(spec, dtype_bytes=4) == spec.params * 4
    assert estimate_weights_bytes(spec, dtype_bytes=2) == spec.params * 2  # served in 16-bit
    fp32 = spec_from_config({**llama_config, "torch_dtype": "float32"})
    assert estimate_weights_bytes(fp32) == spec.params * 4


# Llama-3-8B checkpoints as published: GPTQ 4-bit g128 ~5.7 GB, AWQ ~5.7 GB, FP8 ~9.1 GB, bnb nf4 ~6 GB.
@pytest.mark.parametrize(
    ("quantization_config", "expected_gb"),
    [
        ({"quant_method": "gptq", "bits": 4, "group_size": 128}, 5.74),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True}, 5.74),
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, 9.08),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_use_double_quant": True}, 5.7),
        ({"quant_method": "bitsandbytes", "load_in_8bit": True}, 9.1),
    ],
)
def test_quantized_weights_match_published_checkpoints(
    llama_config: dict[str, Any], quantization_config: dict[str, Any], expected_gb: float
) -> None:
    assert _quantized(llama_config, quantization_config) == pytest.approx(expected_gb * GB, rel=0.05)


def test_scales_and_zero_points_cost_bytes(llama_config: dict[str, Any]) -> None:
    grouped = _quantized(llama_config, {"quant_method": "gptq", "bits": 4, "group_size": 32})
    coarse = _quantized(llama_config, {"quant_method": "gptq", "bits": 4, "group_size": 128})
    per_channel = _quantized(llama_config, {"quant_method": "gptq", "bits": 4, "group_size": -1})
    assert grouped > coarse > per_channel


def test_embeddings_and_lm_head_stay_unquantized(llama_config: dict[str, Any]) -> None:
    spec = spec_from_config({**llama_config, "quantization_config": {"quant_method": "gptq", "bits": 4}})
    unquantized = spec.params - spec.quantizable_params
    # Input embedding and lm_head (untied): 2 x vocab x hidden, at 2 bytes each.
    assert unquantized >= 2 * llama_config["vocab_size"] * llama_config["hidden_size"]
    assert estimate_weights_bytes(spec) > unquantized * 2 + spec.quantizable_params / 2


def test_gguf_weights_are_sized_dequantized_not_as_the_file(tmp_path: Path) -> None:
    # Served through transformers' GGUF loading, which dequantizes: 2 bytes per parameter in fp16, whatever the
    # file's quant type (here Q5_K_M, ~5.1 GB on disk for ~7.2B parameters).
    path = tmp_path / "mistral-7b-instruct-v0.2.Q5_K_M.gguf"
    with path.open("wb") as handle:
        handle.truncate(5_131_409_696)
    from_file = load_spec(path)
    assert estimate_weights_bytes(from_file, dtype_bytes=2) == pytest.approx(2 * from_file.params, abs=1)
    assert estimate_weights_bytes(from_file, dtype_bytes=2) > 5_131_409_696 * 2.5
    by_name = spec_from_name("TheBloke/Mistral-7B-Instruct-v0.2-GGUF/mistral-7b-instruct-v0.2.Q5_K_M.gguf")
    assert estimate_weights_bytes(by_name, dtype_bytes=2) == pytest.approx(14.5e9, rel=0.05)


def test_kv_cache_is_layers_heads_dim_two_bytes_tokens(llama_config: dict[str, Any]) -> None:
    spec = spec_from_config(llama_config)
    one = estimate_kv_cache_bytes(spec, context_length=8192, batch_size=1, kv_dtype_bytes=2)
    assert one == 32 * 8 * 128 * 2 * 2 * 8192 == 1 * GiB
    assert estimate_kv_cache_bytes(spec, context_length=8192, batch_size=4, kv_dtype_bytes=2) == 4 * one
    assert estimate_kv_cache_bytes(spec, context_length=8192, kv_dtype_bytes=1) == one // 2


def test_encoders_have_no_kv_cache(real_configs: dict[str, dict[str, Any]]) -> None:
    bert = spec_from_config(real_configs["google-bert/bert-base-uncased"])
    assert estimate_kv_cache_bytes(bert, context_length=512, batch_size=32) == 0
    assert estimate_activation_bytes(bert, context_length=512, batch_size=32) > 0


def test_activations_are_bounded_by_chunked_prefill(llama_config: dict[str, Any]) -> None:
    spec = spec_from_config(llama_config)
    short = estimate_activation_bytes(spec, context_length=8192)
    long = estimate_activation_bytes(spec, context_length=131072)
    assert short == long  # at most MAX_BATCHED_TOKENS per step, whatever the context
    assert estimate_activation_bytes(spec, context_length=1024) < short


@pytest.mark.parametrize(
    ("gpu_type", "dtype", "kv_dtype"),
    [
        ("h100", "bfloat16", "fp8"),
        ("b200", "bfloat16", "fp8"),
        ("a100-80gb", "bfloat16", "bfloat16"),
        ("l40s", "bfloat16", "bfloat16"),
        ("t4", "float16", "float16"),  # no bf16 before Ampere
        ("cpu", "float32", "float32"),
    ],
)
def test_estimate_memory_is_compatibility_aware(
    llama_config: dict[str, Any], gpu_type: str, dtype: str, kv_dtype: str
) -> None:
    spec = spec_from_config(llama_config)
    estimate = estimate_memory(spec, get_gpu_type(gpu_type), context_length=8192)
    assert (estimate.dtype, estimate.kv_cache_dtype) == (dtype, kv_dtype)
    assert estimate.weights_bytes == spec.params * dtype_bytes(dtype)
    assert estimate.kv_cache_bytes == GiB * dtype_bytes(kv_dtype) // 2
    assert estimate.overhead_bytes == estimate.activation_bytes + estimate.runtime_bytes
    assert estimate.total_bytes == estimate.weights_bytes + estimate.kv_cache_bytes + estimate.overhead_bytes


def test_fp16_checkpoints_stay_fp16_on_bf16_hardware(real_configs: dict[str, dict[str, Any]]) -> None:
    pythia = spec_from_config(real_configs["EleutherAI/pythia-1.4b"])
    assert estimate_memory(pythia, get_gpu_type("a100-80gb"), context_length=2048).dtype == "float16"


def test_runtime_overhead_is_paid_per_gpu(llama_config: dict[str, Any]) -> None:
    spec = spec_from_config(llama_config)
    h100 = get_gpu_type("h100")
    one = estimate_memory(spec, h100, context_length=4096, gpu_count=1)
    two = estimate_memory(spec, h100, context_length=4096, gpu_count=2)
    assert two.weights_bytes == one.weights_bytes and two.kv_cache_bytes == one.kv_cache_bytes
    assert two.runtime_bytes - one.runtime_bytes == GPU_RUNTIME_BYTES
    assert two.activation_bytes == 2 * one.activation_bytes


@pytest.mark.parametrize(("context_length", "batch_size"), [(0, 1), (4096, 0), (-1, 1)])
def test_bad_sizes_are_refused(llama_config: dict[str, Any], context_length: int, batch_size: int) -> None:
    spec = spec_from_config(llama_config)
    with pytest.raises(ConfigError, match="positive integer"):
        estimate_memory(spec, get_gpu_type("h100"), context_length=context_length, batch_size=batch_size)


def test_unknown_dtype_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown dtype 'int3'"):
        dtype_bytes("int3")
