"""Model specs from configs (checked against transformers on the meta device), files and names."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpufleet.gpu.errors import ModelSpecError
from gpufleet.gpu.plan.checkpoint_files import read_config
from gpufleet.gpu.plan.formulas import SUPPORTED_ARCHITECTURES
from gpufleet.gpu.plan.model_names import QuantMethod
from gpufleet.gpu.plan.model_spec import ModelSpec, SpecSource
from gpufleet.gpu.plan.specs import load_spec, spec_from_config, spec_from_name, spec_from_path

MakeDir = Callable[..., Path]
Configs = dict[str, dict[str, Any]]
ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "distilbert"})


def _transformers_param_count(config: dict[str, Any]) -> int:
    """What transformers itself instantiates for ``config``, on the meta device (no memory, no download)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    fields = dict(config)
    model_type = fields.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **fields)
    auto: Any = AutoModel if model_type in ENCODER_TYPES else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------- configs


def test_parameter_count_matches_transformers(real_config: tuple[str, dict[str, Any]]) -> None:
    name, config = real_config
    spec = spec_from_config(config, name=name)
    expected = _transformers_param_count(config)
    assert spec.params == pytest.approx(expected, rel=0.01)
    assert spec.exact and spec.source is SpecSource.CONFIG
    assert 0 < spec.quantizable_params < spec.params
    assert spec.active_params <= spec.params


def test_real_configs_cover_at_least_twelve_architectures(real_configs: Configs) -> None:
    architectures = {config["model_type"] for config in real_configs.values()}
    assert len(architectures) >= 12
    assert architectures <= set(SUPPORTED_ARCHITECTURES)


def test_kv_geometry_from_config(real_configs: Configs) -> None:
    llama = spec_from_config(real_configs["meta-llama/Meta-Llama-3-8B"])
    assert (llama.num_layers, llama.num_kv_heads, llama.head_dim) == (32, 8, 128)
    assert llama.max_position_embeddings == 8192
    gemma = spec_from_config(real_configs["google/gemma-7b"])
    assert gemma.head_dim == 256  # not hidden / heads (192)
    falcon = spec_from_config(real_configs["tiiuae/falcon-7b"])
    assert falcon.num_kv_heads == 1  # multi-query
    falcon40 = spec_from_config(real_configs["tiiuae/falcon-40b"])
    assert falcon40.num_kv_heads == 8
    bert = spec_from_config(real_configs["google-bert/bert-base-uncased"])
    assert bert.is_encoder


def test_moe_from_config(real_configs: Configs) -> None:
    mixtral = spec_from_config(real_configs["mistralai/Mixtral-8x7B-v0.1"])
    assert mixtral.is_moe and (mixtral.num_experts, mixtral.num_experts_per_token) == (8, 2)
    assert mixtral.active_params == pytest.approx(12.9e9, rel=0.01)
    qwen = spec_from_config(real_configs["Qwen/Qwen3-30B-A3B"])
    assert qwen.is_moe and (qwen.num_experts, qwen.num_experts_per_token) == (128, 8)
    assert qwen.params == pytest.approx(30.5e9, rel=0.01)
    assert qwen.active_params == pytest.approx(3.3e9, rel=0.02)
    dense = spec_from_config(real_configs["Qwen/Qwen3-8B"])
    assert not dense.is_moe and dense.active_params == dense.params


def test_tied_embeddings_are_counted_once(real_configs: Configs) -> None:
    tied = real_configs["Qwen/Qwen2.5-0.5B"]
    untied = {**tied, "tie_word_embeddings": False}
    difference = spec_from_config(untied).params - spec_from_config(tied).params
    assert difference == tied["vocab_size"] * tied["hidden_size"]
    assert spec_from_config(tied).tie_word_embeddings


@pytest.mark.parametrize(
    ("dtype_fields", "expected"),
    [
        ({"torch_dtype": "bfloat16"}, "bfloat16"),
        ({"dtype": "float16"}, "float16"),
        ({"torch_dtype": "torch.float32"}, "float32"),
        ({}, "float32"),
    ],
)
def test_dtype_from_torch_dtype_or_dtype(dtype_fields: dict[str, str], expected: str, real_configs: Configs) -> None:
    config = {k: v for k, v in real_configs["mistralai/Mistral-7B-v0.1"].items() if k != "torch_dtype"}
    spec = spec_from_config({**config, **dtype_fields})
    assert spec.dtype == expected
    if not dtype_fields:
        assert any("no dtype" in note for note in spec.notes)


@pytest.mark.parametrize(
    ("quantization_config", "method", "bits", "label"),
    [
        ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}, QuantMethod.GPTQ, 4, "gptq-4bit"),
        ({"quant_method": "gptq", "bits": 8, "group_size": -1}, QuantMethod.GPTQ, 8, "gptq-8bit"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True}, QuantMethod.AWQ, 4, "awq-4bit"),
        (
            {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
            QuantMethod.BNB_4BIT,
            4,
            "bnb-4bit",
        ),
        ({"quant_method": "bitsandbytes", "_load_in_8bit": True}, QuantMethod.BNB_8BIT, 8, "bnb-8bit"),
        (
            {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
            QuantMethod.FP8,
            8,
            "fp8",
        ),
        (
            {
                "quant_method": "compressed-tensors",
                "format": "pack-quantized",
                "config_groups": {
                    "group_0": {
                        "targets": ["Linear"],
                        "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128},
                    }
                },
                "ignore": ["lm_head"],
            },
            QuantMethod.COMPRESSED_TENSORS,
            4,
            "compressed-tensors-w4",
        ),
        (
            {
                "quant_method": "compressed-tensors",
                "format": "float-quantized",
                "config_groups": {
                    "group_0": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"}},
                },
            },
            QuantMethod.COMPRESSED_TENSORS,
            8,
            "compressed-tensors-fp8",
        ),
    ],
)
def test_quantization_from_config(
    quantization_config: dict[str, Any], method: QuantMethod, bits: int, label: str, llama_config: dict[str, Any]
) -> None:
    spec = spec_from_config({**llama_config, "quantization_config": quantization_config})
    assert spec.quantization is not None
    assert spec.quantization.method is method
    assert spec.quantization.bits == bits
    assert spec.quantization.label == label
    assert spec.params == spec_from_config(llama_config).params  # quantization changes bytes, not parameters


def test_fp8_quantizations_need_fp8_hardware(llama_config: dict[str, Any]) -> None:
    fp8 = spec_from_config({**llama_config, "quantization_config": {"quant_method": "fp8"}})
    gptq = spec_from_config({**llama_config, "quantization_config": {"quant_method": "gptq", "bits": 4}})
    assert fp8.quantization is not None and fp8.quantization.fp8_weights
    assert gptq.quantization is not None and not gptq.quantization.fp8_weights


def test_unknown_quantization_method_is_noted(llama_config: dict[str, Any]) -> None:
    spec = spec_from_config({**llama_config, "quantization_config": {"quant_method": "brand-new"}})
    assert spec.quantization is None
    assert any("not recognized" in note for note in spec.notes)


def test_unknown_architecture_is_never_a_llama_shaped_guess(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sizes alone do not make a formula: without weights or transformers the planner refuses."""
    monkeypatch.setattr("gpufleet.gpu.plan.general.transformers_available", lambda: False)
    config = {"model_type": "brand_new_lm", "hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 32000}
    with pytest.raises(ModelSpecError, match=r"'brand_new_lm' has no formula.*install transformers"):
        spec_from_config(config, name="org/brand-new-7B")


def test_unknown_architecture_to_transformers_is_refused_naming_what_is_missing() -> None:
    with pytest.raises(ModelSpecError, match=r"'mystery' has no formula.*cannot build.*Add the checkpoint"):
        spec_from_config({"model_type": "mystery"}, name="org/mystery-7B")


def test_unknown_architecture_without_sizes_falls_back_to_bytes_on_disk() -> None:
    spec = spec_from_config({"model_type": "mystery", "torch_dtype": "bfloat16"}, checkpoint_bytes=14_000_000_000)
    assert spec.params == 7_000_000_000
    assert not spec.exact
    assert "checkpoint size on disk" in spec.notes[0]


def test_known_architecture_missing_a_size_is_refused(llama_config: dict[str, Any]) -> None:
    config = {k: v for k, v in llama_config.items() if k != "hidden_size"}
    with pytest.raises(ModelSpecError, match="hidden_size"):
        spec_from_config(config)


def test_multimodal_config_without_a_formula_counts_the_whole_model(llama_config: dict[str, Any]) -> None:
    """A llava config is not its llama text model: the meta-device count includes the vision tower."""
    config = {
        "model_type": "llava",
        "text_config": dict(llama_config),
        "vision_config": {"hidden_size": 1024, "num_attention_heads": 16},
    }
    spec = spec_from_config(config)
    assert spec.params > spec_from_config(llama_config).params
    assert spec.notes[0].startswith("parameters: meta-device count")


# ------------------------------------------------------------------------------------------------- files


def test_load_spec_from_a_directory_a_config_file_and_a_string(
    make_model_dir: MakeDir, llama_config: dict[str, Any]
) -> None:
    directory = make_model_dir(llama_config, name="Meta-Llama-3-8B")
    for model in (directory, directory / "config.json", str(directory), str(directory / "config.json")):
        spec = load_spec(model)
        assert spec.params == 8_030_261_248
        assert spec.name == "Meta-Llama-3-8B"


def test_sharded_checkpoint_from_its_index(make_model_dir: MakeDir, llama_config: dict[str, Any]) -> None:
    index = {
        "metadata": {"total_size": 16_060_522_496},
        "weight_map": {f"layer.{i}": f"model-0000{i % 4 + 1}-of-00004.safetensors" for i in range(40)},
    }
    directory = make_model_dir(llama_config, files={"model.safetensors.index.json": json.dumps(index)})
    spec = spec_from_path(directory)
    assert spec.num_shards == 4
    assert spec.checkpoint_bytes == 16_060_522_496
    assert any("4 shards" in note for note in spec.notes)


def test_sharded_checkpoint_without_index_counts_files(make_model_dir: MakeDir, llama_config: dict[str, Any]) -> None:
    files: dict[str, str | int] = {"pytorch_model-00001-of-00002.bin": 1000, "pytorch_model-00002-of-00002.bin": 500}
    spec = spec_from_path(make_model_dir(llama_config, files=files))
    assert spec.num_shards == 2
    assert spec.checkpoint_bytes == 1500


def test_unreadable_safetensors_headers_fall_back_to_the_config(
    make_model_dir: MakeDir, llama_config: dict[str, Any]
) -> None:
    spec = spec_from_path(make_model_dir(llama_config, files={"model.safetensors": 1000}))
    assert spec.params == 8_030_261_248 and spec.weights is None
    assert any("safetensors headers not used" in note for note in spec.notes)


def test_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "llama-2-7b.Q4_K_M.gguf"
    with path.open("wb") as handle:
        handle.truncate(4_081_004_224)  # the real file's size, sparse
    spec = load_spec(path)
    assert spec.source is SpecSource.GGUF
    assert spec.quantization is not None and spec.quantization.label == "gguf-Q4_K_M"
    assert spec.params == 7_000_000_000
    assert spec.checkpoint_bytes == 4_081_004_224


def test_gguf_file_without_a_size_in_its_name(tmp_path: Path) -> None:
    directory = tmp_path / "model"
    directory.mkdir()
    with (directory / "model.Q8_0.gguf").open("wb") as handle:
        handle.truncate(8_500_000_000)
    spec = load_spec(directory)
    assert spec.params == pytest.approx(8e9, rel=0.001)
    assert any("file size" in note for note in spec.notes)


# ------------------------------------------------------------------------------------------------- names

# (name, parameters, quantization label, MoE): nominal sizes from names, exact ones from the known-name table.
NAMES: list[tuple[str, float, str, bool]] = [
    ("meta-llama/Llama-3.1-8B-Instruct", 8e9, "none", False),
    ("meta-llama/Llama-3.1-70B-Instruct", 70e9, "none", False),
    ("meta-llama/Llama-3.1-405B-Instruct", 405e9, "none", False),
    ("meta-llama/Llama-3.2-1B", 1e9, "none", False),
    ("meta-llama/Llama-3.2-3B-Instruct", 3e9, "none", False),
    ("meta-llama/Llama-2-7b-hf", 7e9, "none", False),
    ("meta-llama/Llama-2-13b-chat-hf", 13e9, "none", False),
    ("Qwen/Qwen2.5-0.5B-Instruct", 0.5e9, "none", False),
    ("Qwen/Qwen2.5-1.5B", 1.5e9, "none", False),
    ("Qwen/Qwen2.5-7B-Instruct", 7e9, "none", False),
    ("Qwen/Qwen2.5-72B-Instruct", 72e9, "none", False),
    ("Qwen/Qwen3-8B", 8e9, "none", False),
    ("Qwen/Qwen3-30B-A3B", 30e9, "none", True),
    ("Qwen/Qwen3-235B-A22B-Instruct-2507", 235e9, "none", True),
    ("Qwen/Qwen1.5-MoE-A2.7B", 14.3e9, "none", True),
    ("Qwen/Qwen2.5-7B-Instruct-AWQ", 7e9, "awq-4bit", False),
    ("Qwen/Qwen2-7B-Instruct-GPTQ-Int4", 7e9, "gptq-4bit", False),
    ("Qwen/Qwen2-7B-Instruct-GPTQ-Int8", 7e9, "gptq-8bit", False),
    ("mistralai/Mistral-7B-Instruct-v0.3", 7e9, "none", False),
    ("mistralai/Mixtral-8x7B-Instruct-v0.1", 46.7e9, "none", True),
    ("mistralai/Mixtral-8x22B-v0.1", 140.6e9, "none", True),
    ("mistralai/Mistral-Small-24B-Instruct-2501", 24e9, "none", False),
    ("TheBloke/Llama-2-70B-GPTQ", 70e9, "gptq-4bit", False),
    ("TheBloke/Mistral-7B-Instruct-v0.2-AWQ", 7e9, "awq-4bit", False),
    ("TheBloke/Mixtral-8x7B-Instruct-v0.1-GPTQ", 46.7e9, "gptq-4bit", True),
    ("TheBloke/Llama-2-7B-GGUF/llama-2-7b.Q4_K_M.gguf", 7e9, "gguf-Q4_K_M", False),
    ("bartowski/Meta-Llama-3.1-8B-Instruct-GGUF/Meta-Llama-3.1-8B-Instruct-Q8_0.gguf", 8e9, "gguf-Q8_0", False),
    ("TheBloke/Mixtral-8x7B-v0.1-GGUF/mixtral-8x7b-v0.1.Q5_K_M.gguf", 46.7e9, "gguf-Q5_K_M", True),
    ("Qwen/Qwen2.5-7B-Instruct-GGUF/qwen2.5-7b-instruct-iq4_xs.gguf", 7e9, "gguf-IQ4_XS", False),
    ("TheBloke/Llama-2-13B-GGUF", 13e9, "gguf-Q8_0", False),
    ("neuralmagic/Meta-Llama-3.1-70B-Instruct-FP8", 70e9, "fp8", False),
    ("RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8-dynamic", 8e9, "fp8", False),
    ("RedHatAI/Meta-Llama-3.1-8B-Instruct-quantized.w4a16", 8e9, "compressed-tensors-w4", False),
    ("RedHatAI/Meta-Llama-3.1-8B-Instruct-quantized.w8a8", 8e9, "compressed-tensors-w8", False),
    ("unsloth/llama-3-8b-bnb-4bit", 8e9, "bnb-4bit", False),
    ("google/gemma-2-9b-it", 9e9, "none", False),
    ("google/gemma-2-27b-it", 27e9, "none", False),
    ("google/gemma-7b", 8.54e9, "none", False),
    ("google/gemma-2b-it", 2.51e9, "none", False),
    ("microsoft/Phi-3-mini-4k-instruct", 3.82e9, "none", False),
    ("microsoft/phi-2", 2.78e9, "none", False),
    ("openai-community/gpt2", 124.4e6, "none", False),
    ("openai-community/gpt2-xl", 1.558e9, "none", False),
    ("EleutherAI/pythia-70m-deduped", 70e6, "none", False),
    ("EleutherAI/pythia-1.4b", 1.4e9, "none", False),
    ("tiiuae/falcon-7b-instruct", 7e9, "none", False),
    ("tiiuae/falcon-40b", 40e9, "none", False),
    ("google-bert/bert-base-uncased", 109.5e6, "none", False),
    ("sentence-transformers/all-MiniLM-L6-v2", 22.7e6, "none", False),
    ("BAAI/bge-large-en-v1.5", 335e6, "none", False),
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", 32e9, "none", False),
    ("deepseek-ai/DeepSeek-V3", 671e9, "none", True),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", 135e6, "none", False),
    ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", 1.1e9, "none", False),
    ("openai/gpt-oss-20b", 20.9e9, "none", True),
    ("meta-llama/Llama-4-Scout-17B-16E-Instruct", 108.6e9, "none", True),
    ("bigscience/bloom-560m", 560e6, "none", False),
    ("facebook/opt-125m", 125e6, "none", False),
]


def test_at_least_forty_real_names() -> None:
    assert len({name for name, *_ in NAMES}) >= 40


@pytest.mark.parametrize(("name", "params", "quantization", "is_moe"), NAMES, ids=[n for n, *_ in NAMES])
def test_spec_from_name(name: str, params: float, quantization: str, is_moe: bool) -> None:
    spec = load_spec(name)
    assert spec.params == pytest.approx(params, rel=0.01)
    assert (spec.quantization.label if spec.quantization else "none") == quantization
    assert spec.is_moe is is_moe
    assert not spec.exact
    assert spec.source in (SpecSource.NAME, SpecSource.GGUF)
    assert spec.notes, "a name-only spec says it is an estimate"
    if is_moe:
        assert spec.active_params < spec.params
    assert spec.num_layers > 0 and spec.head_dim > 0


def test_active_parameters_from_names() -> None:
    assert spec_from_name("Qwen/Qwen3-30B-A3B").active_params == 3_000_000_000
    mixtral = spec_from_name("someone/Mixtral-8x7B-finetune")  # not in the table: from the 8x7B rule
    assert mixtral.params == pytest.approx(46.7e9, rel=0.02)
    assert mixtral.num_experts == 8 and mixtral.num_experts_per_token == 2


def test_encoders_by_name_have_no_kv_cache_shape_issue() -> None:
    spec = spec_from_name("sentence-transformers/all-MiniLM-L6-v2")
    assert spec.is_encoder
    assert spec.max_position_embeddings == 512


def test_gguf_repo_without_a_quant_type_says_what_it_assumed() -> None:
    spec = spec_from_name("TheBloke/Llama-2-13B-GGUF")
    assert any("assumed Q8_0" in note for note in spec.notes)


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("empty", ["", "   "])
def test_empty_name_is_refused(empty: str) -> None:
    with pytest.raises(ModelSpecError, match="empty"):
        load_spec(empty)


def test_name_without_size_or_known_family_is_refused() -> None:
    with pytest.raises(ModelSpecError, match=r"cannot size model 'acme/mystery-model'.*no size"):
        load_spec("acme/mystery-model")


def test_config_that_is_not_json_is_refused(make_model_dir: MakeDir) -> None:
    directory = make_model_dir("{ this is not json", name="broken")
    with pytest.raises(ModelSpecError, match=r"not valid JSON .*line 1"):
        load_spec(directory)


def test_config_that_is_not_an_object_is_refused(make_model_dir: MakeDir) -> None:
    with pytest.raises(ModelSpecError, match="not an object"):
        load_spec(make_model_dir("[1, 2, 3]"))


def test_read_config_reads_each_version_of_the_file_once(
    make_model_dir: MakeDir, llama_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    config_path = make_model_dir(llama_config) / "config.json"
    reads: list[Path] = []
    real_read_text = Path.read_text

    def counting_read_text(self: Path, *args: Any, **kwargs: Any) -> str:
        reads.append(self)
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting_read_text)
    first = read_config(config_path)
    first["hidden_size"] = -1  # callers get copies: this must not leak into the cache
    assert read_config(config_path) == llama_config
    load_spec(config_path.parent)
    assert reads == [config_path]

    rewritten = {**llama_config, "num_hidden_layers": 3}
    real_write = json.dumps(rewritten) + " " * 64  # a different size, so even a coarse mtime sees a change
    with config_path.open("w") as handle:
        handle.write(real_write)
    assert read_config(config_path)["num_hidden_layers"] == 3
    assert len(reads) == 2


def test_read_config_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match="cannot read"):
        read_config(tmp_path / "config.json")


@pytest.mark.parametrize("missing", ["/nonexistent/model", "./no/such/config.json", "~/no-such-model-dir"])
def test_missing_path_is_refused(missing: str) -> None:
    with pytest.raises(ModelSpecError, match="does not exist"):
        load_spec(missing)


def test_missing_path_object_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match="does not exist"):
        load_spec(tmp_path / "nope")


def test_directory_without_config_or_gguf_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match=r"neither a config.json nor a .gguf"):
        load_spec(tmp_path)


def test_load_spec_passes_a_spec_through() -> None:
    spec = spec_from_name("meta-llama/Llama-3.1-8B-Instruct")
    assert load_spec(spec) is spec
    assert isinstance(spec, ModelSpec)
