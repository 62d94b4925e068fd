"""GPU selection: every placement fits, nothing cheaper would, compatibility and CPU rules, clear errors."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpufleet.gpu.errors import ConfigError, ModelSpecError, PlanningError
from gpufleet.gpu.plan.catalog import CATALOG, GpuType, all_types, get_gpu_type
from gpufleet.gpu.plan.estimate import estimate_memory
from gpufleet.gpu.plan.model_spec import ModelSpec
from gpufleet.gpu.plan.report import render_placement
from gpufleet.gpu.plan.selection import (
    GPU_COUNTS,
    MAX_MEMORY_UTILIZATION,
    Placement,
    base_utilization,
    compatibility_problem,
    get_gpu_config,
    get_gpu_placement,
    plan,
)
from gpufleet.gpu.plan.specs import load_spec, spec_from_config

Configs = dict[str, dict[str, Any]]

PLACEMENT_FIELDS = [
    "gpu_type",
    "gpu_count",
    "memory_utilization",
    "params",
    "weights_bytes",
    "kv_cache_bytes",
    "overhead_bytes",
    "quantization",
    "is_moe",
    "fallbacks",
    "reasons",
    "engine",
]

MODELS = [
    "meta-llama/Llama-3.1-8B-Instruct",
    "meta-llama/Llama-3.1-70B-Instruct",
    "meta-llama/Llama-3.1-405B-Instruct",
    "meta-llama/Llama-3.1-405B-Instruct-FP8",
    "Qwen/Qwen2.5-0.5B-Instruct",
    "Qwen/Qwen2.5-72B-Instruct-AWQ",
    "Qwen/Qwen3-30B-A3B",
    "Qwen/Qwen3-235B-A22B",
    "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "mistralai/Mixtral-8x22B-v0.1",
    "TheBloke/Llama-2-70B-GPTQ",
    "TheBloke/Llama-2-7B-GGUF/llama-2-7b.Q4_K_M.gguf",
    "neuralmagic/Meta-Llama-3.1-70B-Instruct-FP8",
    "unsloth/llama-3-8b-bnb-4bit",
    "google/gemma-2-27b-it",
    "microsoft/Phi-3-mini-4k-instruct",
    "openai-community/gpt2",
    "sentence-transformers/all-MiniLM-L6-v2",
    "deepseek-ai/DeepSeek-V3",
    "HuggingFaceTB/SmolLM2-135M-Instruct",
]


def _fits(spec: ModelSpec, gpu_type: str, count: int, context: int, batch: int) -> bool:
    gpu = get_gpu_type(gpu_type)
    if compatibility_problem(spec, gpu) is not None:
        return False
    estimate = estimate_memory(spec, gpu, context_length=context, batch_size=batch, gpu_count=count)
    return estimate.total_bytes <= MAX_MEMORY_UTILIZATION * gpu.memory_bytes * count


def _check_placement(spec: ModelSpec, placement: Placement, *, prefer: str, batch: int) -> None:
    gpu = get_gpu_type(placement.gpu_type)
    context = placement.engine.max_model_len
    # It fits in what it claims.
    assert placement.total_bytes <= placement.memory_utilization * gpu.memory_bytes * placement.gpu_count
    assert 0.55 <= placement.memory_utilization <= MAX_MEMORY_UTILIZATION
    assert compatibility_problem(spec, gpu) is None
    gpus = all_types(include_cpu=False)
    if placement.gpu_count == 1:
        # No cheaper (or, preferring memory, smaller) single GPU would also fit.
        for other in gpus:
            cheaper = (
                other.price_per_hour_usd < gpu.price_per_hour_usd
                if prefer == "cost"
                else other.memory_bytes < gpu.memory_bytes
            )
            if cheaper:
                assert not _fits(spec, other.name, 1, context, batch), f"{other.name} is cheaper and fits"
    else:
        # No single GPU fits, and no cheaper multi-GPU combination would.
        assert not any(_fits(spec, other.name, 1, context, batch) for other in gpus)

        def measure(g: GpuType, count: int) -> float:
            return (g.price_per_hour_usd if prefer == "cost" else g.memory_bytes) * count

        for other in gpus:
            for count in GPU_COUNTS:
                if measure(other, count) < measure(gpu, placement.gpu_count):
                    assert not _fits(spec, other.name, count, context, batch), f"{count} x {other.name} fits"
    for fallback in placement.fallbacks:
        assert _fits(spec, fallback, placement.gpu_count, context, batch)


@pytest.mark.parametrize("prefer", ["cost", "memory"])
@pytest.mark.parametrize(("context_length", "batch_size"), [(None, 1), (32768, 1), (4096, 16)])
def test_every_placement_fits_and_nothing_cheaper_would(
    prefer: str, context_length: int | None, batch_size: int, real_configs: Configs
) -> None:
    specs = [load_spec(name) for name in MODELS]
    specs += [spec_from_config(config, name=name) for name, config in real_configs.items()]
    planned = 0
    for spec in specs:
        try:
            placement = plan(spec, context_length=context_length, batch_size=batch_size, prefer=prefer)
        except PlanningError:
            # Only the very largest models at long contexts and big batches may not fit 8 x b200.
            assert spec.params > 300e9 or batch_size > 1
            continue
        _check_placement(spec, placement, prefer=prefer, batch=batch_size)
        planned += 1
    assert planned >= len(specs) - 4


def test_placement_has_exactly_the_issue_fields_and_serializes_to_json() -> None:
    placement = plan("meta-llama/Llama-3.1-8B-Instruct")
    assert [f.name for f in dataclasses.fields(Placement)] == PLACEMENT_FIELDS
    data = placement.to_dict()
    assert list(data) == PLACEMENT_FIELDS
    assert json.loads(json.dumps(data)) == data
    assert isinstance(data["fallbacks"], list) and isinstance(data["reasons"], list)
    assert data["engine"]["pytorch_cuda_alloc_conf"] == "expandable_segments:True"
    with pytest.raises(dataclasses.FrozenInstanceError):
        placement.gpu_type = "b200"  # type: ignore[misc]


def test_seed_interface() -> None:
    gpu_type, utilization = get_gpu_config("meta-llama/Llama-3.1-8B-Instruct")
    assert gpu_type in CATALOG and gpu_type != "cpu"
    assert 0.55 <= utilization <= MAX_MEMORY_UTILIZATION
    placement = plan("meta-llama/Llama-3.1-8B-Instruct")
    assert (gpu_type, utilization) == (placement.gpu_type, placement.memory_utilization)
    assert get_gpu_placement("meta-llama/Llama-3.1-8B-Instruct") == (gpu_type, 1, utilization)


def test_seed_interface_warns_when_it_hides_a_gpu_count() -> None:
    model = "meta-llama/Llama-3.1-405B-Instruct"
    placement = plan(model)
    assert placement.gpu_count > 1
    gpu_type, gpu_count, utilization = get_gpu_placement(model)
    assert (gpu_type, gpu_count, utilization) == (
        placement.gpu_type,
        placement.gpu_count,
        placement.memory_utilization,
    )
    message = rf"needs {gpu_count} x {gpu_type}.*get_gpu_placement"
    with pytest.warns(UserWarning, match=message):
        assert get_gpu_config(model) == (gpu_type, utilization)


def test_small_model_goes_to_the_cheapest_gpu_at_high_utilization() -> None:
    placement = plan("Qwen/Qwen2.5-0.5B-Instruct")
    assert placement.gpu_type == "t4"
    assert placement.memory_utilization == 0.90
    assert placement.fallbacks[0] == "l4"  # cheapest first
    prices = [get_gpu_type(name).price_per_hour_usd for name in placement.fallbacks]
    assert prices == sorted(prices)


def test_prefer_memory_picks_the_smallest_device() -> None:
    by_cost = plan("Qwen/Qwen2.5-14B-Instruct", prefer="cost")
    by_memory = plan("Qwen/Qwen2.5-14B-Instruct", prefer="memory")
    assert get_gpu_type(by_memory.gpu_type).memory_bytes <= get_gpu_type(by_cost.gpu_type).memory_bytes


def test_large_models_get_conservative_utilization_unless_raised_to_fit() -> None:
    for name in ("TheBloke/Llama-2-70B-GPTQ", "google/gemma-2-27b-it", "Qwen/Qwen3-30B-A3B"):
        placement = plan(name)
        base, _ = base_utilization(placement.params, placement.gpu_count)
        assert 0.60 <= base <= 0.75
        gpu = get_gpu_type(placement.gpu_type)
        if placement.memory_utilization > base:
            # Raised only because the default would not have held it.
            assert placement.total_bytes > base * gpu.memory_bytes * placement.gpu_count
            assert any("raised" in reason for reason in placement.reasons)


def test_models_too_big_for_one_gpu_are_sharded() -> None:
    placement = plan("meta-llama/Llama-3.1-405B-Instruct")
    assert placement.gpu_count in (2, 4, 8)
    assert placement.engine.tensor_parallel_size == placement.gpu_count
    assert placement.memory_utilization >= 0.55
    assert any("tensor parallel" in reason for reason in placement.reasons)
    two_h100 = plan("meta-llama/Llama-3.1-70B-Instruct", allowed_types=["h100"])
    assert (two_h100.gpu_type, two_h100.gpu_count) == ("h100", 2)


def test_no_option_is_a_clear_planning_error() -> None:
    with pytest.raises(PlanningError, match=r"needs .* largest allowed option, 8 x t4.*quantized variant"):
        plan("meta-llama/Llama-3.1-405B-Instruct", allowed_types=["t4"])


def test_fp8_weights_only_on_fp8_hardware() -> None:
    placement = plan("neuralmagic/Meta-Llama-3.1-8B-Instruct-FP8", allowed_types=["t4", "a100-80gb", "l4"])
    assert placement.gpu_type == "l4"
    assert any("a100-80gb: FP8 weights need compute capability 8.9" in reason for reason in placement.reasons)
    with pytest.raises(PlanningError, match=r"FP8 weights need compute capability 8\.9"):
        plan("neuralmagic/Meta-Llama-3.1-8B-Instruct-FP8", allowed_types=["t4", "a100-80gb"])


def test_bf16_model_runs_in_fp16_before_ampere() -> None:
    placement = plan("meta-llama/Llama-3.2-1B", allowed_types=["t4"])
    assert placement.engine.dtype == "float16"
    assert any("no bf16" in reason for reason in placement.reasons)


def test_fp8_kv_cache_on_hopper_and_later() -> None:
    h100 = plan("meta-llama/Llama-3.1-8B-Instruct", allowed_types=["h100"])
    a100 = plan("meta-llama/Llama-3.1-8B-Instruct", allowed_types=["a100-80gb"])
    assert h100.engine.kv_cache_dtype == "fp8" and a100.engine.kv_cache_dtype == "auto"
    assert h100.kv_cache_bytes * 2 == a100.kv_cache_bytes


def test_engine_settings() -> None:
    engine = plan("TheBloke/Llama-2-70B-GPTQ").engine
    assert engine.quantization == "gptq"
    assert engine.enable_chunked_prefill and engine.enable_prefix_caching
    assert engine.block_size == 16
    encoder = plan("sentence-transformers/all-MiniLM-L6-v2").engine
    assert not encoder.enable_prefix_caching and not encoder.enable_chunked_prefill


def test_cpu_only_when_allowed() -> None:
    assert plan("openai-community/gpt2").gpu_type != "cpu"
    only_cpu = plan("openai-community/gpt2", allowed_types=("cpu",))
    assert (only_cpu.gpu_type, only_cpu.gpu_count) == ("cpu", 1)
    assert only_cpu.engine.dtype == "float32" and only_cpu.engine.pytorch_cuda_alloc_conf is None
    assert any("cpu chosen: it is the only allowed type" in reason for reason in only_cpu.reasons)
    mixed = plan("openai-community/gpt2", allowed_types=("cpu", "t4"))
    assert mixed.gpu_type == "t4"
    assert mixed.fallbacks[-1] == "cpu"
    assert any("cpu allowed but not chosen" in reason for reason in mixed.reasons)


def test_cpu_is_chosen_when_no_allowed_gpu_can_run_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # No real GPU type is too small for a model that fits the CPU, so shrink the T4 to show the rule.
    def tiny_t4(*, include_cpu: bool = True) -> tuple[Any, ...]:
        return tuple(
            dataclasses.replace(g, memory_bytes=1024) if g.name == "t4" else g
            for g in all_types(include_cpu=include_cpu)
        )

    monkeypatch.setattr("gpufleet.gpu.plan.selection.all_types", tiny_t4)
    placement = plan("openai-community/gpt2", allowed_types=("t4", "cpu"))
    assert placement.gpu_type == "cpu"
    assert any("no allowed GPU type can hold or run the model" in reason for reason in placement.reasons)


def test_quantized_formats_other_than_gguf_are_not_planned_on_cpu() -> None:
    with pytest.raises(PlanningError, match="cpu: gptq-4bit weights need CUDA"):
        plan("TheBloke/Llama-2-7B-GPTQ", allowed_types=("cpu",))
    assert plan("TheBloke/Llama-2-7B-GGUF/llama-2-7b.Q4_K_M.gguf", allowed_types=("cpu",)).gpu_type == "cpu"


def test_default_context_length(real_configs: Configs) -> None:
    long = spec_from_config(real_configs["Qwen/Qwen2-7B"])  # 131072 positions
    short = spec_from_config(real_configs["EleutherAI/pythia-1.4b"])  # 2048
    assert plan(long).engine.max_model_len == 8192
    assert plan(short).engine.max_model_len == 2048
    assert plan("meta-llama/Llama-3.1-8B-Instruct").engine.max_model_len == 4096
    assert plan(long, context_length=32768).engine.max_model_len == 32768
    over = plan(short, context_length=4096)
    assert any("exceeds the model's maximum" in reason for reason in over.reasons)


def test_longer_context_and_bigger_batch_need_more_kv_cache() -> None:
    base = plan("meta-llama/Llama-3.1-8B-Instruct", context_length=4096, allowed_types=["h100"])
    longer = plan("meta-llama/Llama-3.1-8B-Instruct", context_length=16384, allowed_types=["h100"])
    bigger = plan("meta-llama/Llama-3.1-8B-Instruct", context_length=4096, batch_size=4, allowed_types=["h100"])
    assert longer.kv_cache_bytes == 4 * base.kv_cache_bytes == bigger.kv_cache_bytes


def test_plan_accepts_names_paths_and_specs(make_model_dir: Callable[..., Path], llama_config: dict[str, Any]) -> None:
    directory = make_model_dir(llama_config, name="Meta-Llama-3-8B")
    by_dir, by_file, by_str = plan(directory), plan(directory / "config.json"), plan(str(directory))
    by_spec = plan(load_spec(directory))
    assert by_dir == by_file == by_str == by_spec
    assert by_dir.params == 8_030_261_248
    assert by_dir.engine.max_model_len == 8192


def test_plan_reasons_name_the_parameter_source(make_model_dir: Callable[..., Path]) -> None:
    config = {
        "model_type": "jamba",
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "vocab_size": 1000,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "intermediate_size": 1024,
        "num_experts": 4,
    }
    placement = plan(make_model_dir(config))
    assert placement.reasons[0].startswith("parameters: meta-device count (transformers ")
    mamba = {"model_type": "mamba", "hidden_size": 768, "num_hidden_layers": 24, "vocab_size": 50280}
    placement = plan(make_model_dir(mamba, name="mamba"))
    assert placement.reasons[0] == "parameters: formula mamba (state space, no KV cache)"
    assert placement.kv_cache_bytes == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"prefer": "speed"}, ConfigError, "prefer='speed'"),
        ({"allowed_types": ["v100"]}, ConfigError, "unknown GPU type 'v100'"),
        ({"allowed_types": []}, ConfigError, "allowed_types is empty"),
        ({"context_length": 0}, ConfigError, "context_length"),
        ({"batch_size": 0}, ConfigError, "batch_size"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        plan("meta-llama/Llama-3.1-8B-Instruct", **kwargs)


@pytest.mark.parametrize("model", ["", "acme/mystery-model", "/no/such/model/dir"])
def test_bad_models_are_refused(model: str) -> None:
    with pytest.raises(ModelSpecError):
        plan(model)


def test_plan_report_renders_a_table() -> None:
    placement = plan("mistralai/Mixtral-8x7B-Instruct-v0.1")
    text = render_placement(
        placement, model="mistralai/Mixtral-8x7B-Instruct-v0.1", extra_rows=[("queue", "the-callers-queue")]
    )
    lines = text.splitlines()
    assert lines[0] == "plan for mistralai/Mixtral-8x7B-Instruct-v0.1"
    assert lines[1].split()[0] == "GPU" and lines[2].split() == ["queue", "the-callers-queue"]
    assert "(MoE)" in text and "why:" in text
    assert "queue" not in render_placement(placement)  # planning knows no queues: the caller adds them
    for reason in placement.reasons:
        assert reason in text
    sharded = render_placement(plan("meta-llama/Llama-3.1-405B-Instruct"))
    assert " x " in sharded.splitlines()[0]


def test_planning_from_a_config_directory(make_model_dir: Callable[..., Path], llama_config: dict[str, Any]) -> None:
    """The planning core end to end on a model directory (that it needs no torch is lint-imports' plan-pure rule)."""
    from gpufleet.gpu.plan import estimate, specs

    directory = make_model_dir(llama_config)
    assert estimate.estimate_weights_bytes(specs.load_spec(directory)) == 16060522496  # Llama-3-8B in bf16
