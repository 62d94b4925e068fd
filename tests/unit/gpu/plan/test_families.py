"""The newer families' formulas against transformers' own count on the meta device, and their KV layouts."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from gpufleet.gpu.plan.counting import KvKind
from gpufleet.gpu.plan.estimate import estimate_kv_cache_bytes
from gpufleet.gpu.plan.specs import spec_from_config


def _hf_config(model_type: str, **fields: Any) -> dict[str, Any]:
    """A config.json as transformers' own config class writes it (defaults filled in)."""
    from transformers import AutoConfig

    return dict(AutoConfig.for_model(model_type, **fields).to_dict())


def _meta_count(config: dict[str, Any], class_name: str) -> int:
    import torch
    import transformers
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k != "model_type"}
    hf_config = AutoConfig.for_model(config["model_type"], **fields)
    with torch.device("meta"):
        model = getattr(transformers, class_name)._from_config(hf_config)
    return sum(p.numel() for p in model.parameters())


DBRX_132B = {  # databricks/dbrx-base's published config
    "d_model": 6144,
    "n_heads": 48,
    "n_layers": 40,
    "max_seq_len": 32768,
    "vocab_size": 100352,
    "attn_config": {"kv_n_heads": 8, "rope_theta": 500000.0, "clip_qkv": 8},
    "ffn_config": {"ffn_hidden_size": 10752, "moe_num_experts": 16, "moe_top_k": 4},
}

CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("dbrx", "DbrxForCausalLM", DBRX_132B),
    ("mamba", "MambaForCausalLM", {"hidden_size": 2560, "num_hidden_layers": 64, "vocab_size": 50280}),
    ("mamba2", "Mamba2ForCausalLM", {}),
    ("deepseek_v3", "DeepseekV3ForCausalLM", {}),
    ("deepseek_v2", "DeepseekV2ForCausalLM", {"q_lora_rank": None, "first_k_dense_replace": 1}),  # V2-Lite style
    ("llama4", "Llama4ForConditionalGeneration", {}),
    ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", {}),
    (
        "qwen2_5_vl",
        "Qwen2_5_VLForConditionalGeneration",
        {
            "text_config": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36},
            "vision_config": {"out_hidden_size": 2048},
            "tie_word_embeddings": True,
        },
    ),
]


@pytest.mark.parametrize(
    ("model_type", "class_name", "fields"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_formula_matches_the_meta_device_count(model_type: str, class_name: str, fields: dict[str, Any]) -> None:
    config = _hf_config(model_type, **fields)
    spec = spec_from_config(config)
    expected = _meta_count(config, class_name)
    assert spec.params == pytest.approx(expected, rel=0.01)
    assert spec.params >= expected  # a plan is never smaller than the model
    assert spec.notes[0].startswith(f"parameters: formula {model_type} (")
    assert spec.exact and 0 < spec.quantizable_params < spec.params and spec.active_params <= spec.params


def test_dbrx_is_counted_at_its_size_and_needs_more_than_one_l40s() -> None:
    from gpufleet.gpu.plan.selection import plan

    spec = spec_from_config({"model_type": "dbrx", **DBRX_132B, "torch_dtype": "bfloat16"})
    assert spec.params == pytest.approx(131.6e9, rel=0.01)
    assert spec.active_params == pytest.approx(36e9, rel=0.03)
    assert (spec.num_experts, spec.num_experts_per_token, spec.num_kv_heads) == (16, 4, 8)
    placement = plan(spec)
    assert placement.weights_bytes >= 2 * spec.params
    assert (placement.gpu_type, placement.gpu_count) != ("l40s", 1)


def test_mamba_has_no_kv_cache() -> None:
    spec = spec_from_config(_hf_config("mamba", hidden_size=2560, num_hidden_layers=64))
    assert spec.kv_layout is not None and spec.kv_layout.kind is KvKind.NONE
    assert estimate_kv_cache_bytes(spec, context_length=32_768, batch_size=8) == 0
    assert spec.params == pytest.approx(2.77e9, rel=0.01)  # state-spaces/mamba-2.8b-hf


def test_deepseek_v3_caches_the_mla_latent() -> None:
    spec = spec_from_config(_hf_config("deepseek_v3"))
    assert spec.params == pytest.approx(671e9, rel=0.01) and spec.active_params == pytest.approx(37.5e9, rel=0.03)
    assert spec.kv_layout is not None and spec.kv_layout.kind is KvKind.MLA
    # 61 layers x (512 latent + 64 rotary) elements x 2 bytes per token.
    assert estimate_kv_cache_bytes(spec, context_length=1000) == 61 * 576 * 2 * 1000
    plain_gqa = 61 * 2 * 128 * 192 * 2 * 1000  # what a plain formula would give: 85x more
    assert estimate_kv_cache_bytes(spec, context_length=1000) * 80 < plain_gqa


def test_llama4_counts_its_vision_tower_and_chunked_attention() -> None:
    config = _hf_config("llama4")
    spec = spec_from_config(config)
    text_fields = {k: v for k, v in config["text_config"].items() if k != "model_type"}
    text_only = _meta_count(_hf_config("llama4_text", **text_fields), "Llama4ForCausalLM")
    assert spec.params > text_only  # the vision tower and projector are part of the checkpoint
    layout = spec.kv_layout
    assert layout is not None and (layout.full_layers, layout.window_layers, layout.window) == (12, 36, 8192)
    short, long = (estimate_kv_cache_bytes(spec, context_length=n) for n in (8192, 65536))
    assert long < 8 * short  # chunked layers stop growing at 8192 tokens


def test_sliding_window_layers_cache_at_most_their_window(real_configs: dict[str, dict[str, Any]]) -> None:
    gemma2 = spec_from_config(real_configs["google/gemma-2-9b"])
    layout = gemma2.kv_layout
    assert layout is not None and (layout.full_layers, layout.window_layers, layout.window) == (21, 21, 4096)
    per_token = 2 * 8 * 256 * 2
    assert estimate_kv_cache_bytes(gemma2, context_length=8192) == per_token * (21 * 8192 + 21 * 4096)
    mistral = spec_from_config(real_configs["mistralai/Mistral-7B-v0.1"])
    assert estimate_kv_cache_bytes(mistral, context_length=32_768) == 32 * 2 * 8 * 128 * 2 * 4096
    llama = spec_from_config(real_configs["meta-llama/Meta-Llama-3-8B"])  # GQA, every layer full
    assert estimate_kv_cache_bytes(llama, context_length=1000) == 32 * 2 * 8 * 128 * 2 * 1000


@pytest.mark.parametrize(("model_type", "attention_layers"), [("jamba", 4), ("qwen3_next", 12)])
def test_hybrid_models_cache_only_their_attention_layers(model_type: str, attention_layers: int) -> None:
    """Hybrids take the general path: the meta-device count, and KV only for the attention layers."""
    config = _hf_config(model_type)
    spec = spec_from_config(config)
    assert spec.notes[0].startswith("parameters: meta-device count")
    layout = spec.kv_layout
    assert layout is not None and layout.full_layers == attention_layers
    assert layout.stateless_layers == spec.num_layers - attention_layers > 0
    full = spec.num_layers * layout.token_elements * 2 * 1000
    assert estimate_kv_cache_bytes(spec, context_length=1000) == full * attention_layers // spec.num_layers


def test_jamba_without_transformers_reads_its_attention_period(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gpufleet.gpu.plan.general.transformers_available", lambda: False)
    config = _hf_config("jamba")
    spec = spec_from_config(config, checkpoint_bytes=100_000_000_000)
    assert spec.kv_layout is not None and spec.kv_layout.full_layers == 4 and spec.kv_layout.stateless_layers == 28


ROUTER_WITHOUT_TRANSFORMERS = textwrap.dedent(
    """
    import json, sys
    sys.modules["torch"] = None
    sys.modules["transformers"] = None
    from gpufleet.gpu.errors import ModelSpecError
    from gpufleet.gpu.plan.selection import plan
    out = {}
    for name in sys.argv[1:3]:
        placement = plan(name)
        out[name] = [placement.params, placement.reasons[0]]
    try:
        plan(sys.argv[3])
    except ModelSpecError as exc:
        out["refused"] = str(exc)
    print(json.dumps(out))
    """
)


def test_router_plans_known_families_without_transformers(tmp_path: Path) -> None:
    import json

    dirs = []
    for model_type, fields in (("deepseek_v3", {}), ("mamba", {}), ("brand_new_lm", {"hidden_size": 64})):
        config = _hf_config(model_type, **fields) if model_type != "brand_new_lm" else {"model_type": model_type}
        directory = tmp_path / model_type
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(config))
        dirs.append(str(directory))
    result = subprocess.run(
        [sys.executable, "-c", ROUTER_WITHOUT_TRANSFORMERS, *dirs], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out[dirs[0]][1] == "parameters: formula deepseek_v3 (MLA + MoE)"
    assert out[dirs[1]][1] == "parameters: formula mamba (state space, no KV cache)"
    assert "install transformers" in out["refused"] and "'brand_new_lm'" in out["refused"]
