"""The one checkpoint builder: every architecture, dtype, tied or not, sharded or not, in memory or streamed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpufleet.gpu.errors import ConfigError
from gpufleet.gpu.runtime.inference import generate
from gpufleet.gpu.runtime.loader import FastSafetensorsLoader, PretrainedLoader
from gpufleet.gpu.runtime.options import GenerateOptions
from gpufleet.workers.tools.checkpoints import (
    ARCHITECTURES,
    ENCODERS,
    make_checkpoint,
    outputs,
    sample_inputs,
    write_checkpoint,
)
from gpufleet.workers.tools.families import MULTIMODAL
from gpufleet.workers.tools.shapes import Shape
from gpufleet.workers.tools.tokenizer import demo_tokenizer

CAUSAL = [arch for arch in ARCHITECTURES if arch not in ENCODERS | MULTIMODAL]


def _header(file: Path) -> dict[str, dict[str, object]]:
    raw = file.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    entries: dict[str, dict[str, object]] = json.loads(raw[8 : 8 + length])
    entries.pop("__metadata__", None)
    return entries


@pytest.mark.parametrize("arch", CAUSAL)
def test_each_causal_arch_loads_and_generates(arch: str, tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / arch, arch)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == arch
    assert config["vocab_size"] == len(demo_tokenizer())
    assert json.loads((path / "generation_config.json").read_text())["do_sample"] is False
    loaded = PretrainedLoader().load(f"test/{arch}", path, device="cpu", dtype="float32")
    result = generate(loaded, GenerateOptions(prompt="The weather", max_new_tokens=4))
    assert 0 < result.completion_tokens <= 4


def test_bert_is_saved_as_a_bare_encoder(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "bert", "bert")
    loaded = PretrainedLoader().load("test/bert", path, device="cpu", dtype="float32")
    assert type(loaded.module).__name__ == "BertModel"
    assert outputs(loaded.module, sample_inputs()).shape == (2, 8, 128)


def test_sharded_and_tied(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "sharded", tie=True, max_shard_size="200KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((path / shard).is_file() for shard in shards)
    assert not (path / "model.safetensors").exists()
    # Tied: the checkpoint holds the embedding once, with no separate output head.
    assert "lm_head.weight" not in index["weight_map"]
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is True
    loaded = PretrainedLoader().load("test/sharded", path, device="cpu", dtype="float32")
    assert loaded.module.lm_head.weight.data_ptr() == loaded.module.model.embed_tokens.weight.data_ptr()


def test_tie_defaults_to_the_architecture(tmp_path: Path) -> None:
    gpt2 = json.loads((make_checkpoint(tmp_path / "gpt2", "gpt2") / "config.json").read_text())
    llama = json.loads((make_checkpoint(tmp_path / "llama", "llama") / "config.json").read_text())
    assert gpt2["tie_word_embeddings"] is True and llama["tie_word_embeddings"] is False


def test_same_seed_same_weights_and_caller_rng_untouched(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = make_checkpoint(tmp_path / "a", seed=3, with_tokenizer=False)
    assert torch.equal(torch.rand(3), expected)
    b = make_checkpoint(tmp_path / "b", seed=3, with_tokenizer=False)
    c = make_checkpoint(tmp_path / "c", seed=4, with_tokenizer=False)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert not (a / "tokenizer.json").exists()


def test_dtype_and_custom_shape(tmp_path: Path) -> None:
    shape = Shape(hidden=64, layers=3, heads=2, kv_heads=1, intermediate=96, max_positions=256)
    path = make_checkpoint(tmp_path / "half", "qwen2", size=shape, dtype="bfloat16", with_tokenizer=False)
    assert {entry["dtype"] for entry in _header(path / "model.safetensors").values()} == {"BF16"}
    config = json.loads((path / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (64, 3, 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arch": "t5"}, "architecture 't5' is not supported"),
        ({"dtype": "int8"}, "dtype 'int8'"),
        ({"size": "huge"}, "size 'huge' is unknown"),
    ],
)
def test_refuses_bad_arguments(kwargs: dict[str, str], match: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=match):
        make_checkpoint(tmp_path / "x", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=match):
        write_checkpoint(tmp_path / "y", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("someone's file")
    with pytest.raises(ConfigError, match="not empty"):
        make_checkpoint(tmp_path / "taken")
    with pytest.raises(ConfigError, match="not empty"):
        write_checkpoint(tmp_path / "taken", "tiny")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "someone's file"


def test_unwritable_directory_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("a file where a directory should be")
    with pytest.raises(ConfigError, match="could not write"):
        make_checkpoint(tmp_path / "a-file" / "model")


# --- streamed ---------------------------------------------------------------------------------------------


def test_streamed_checkpoint_matches_the_in_memory_layout(tmp_path: Path) -> None:
    streamed = write_checkpoint(tmp_path / "streamed", "tiny", dtype="float32")
    built = make_checkpoint(tmp_path / "built", dtype="float32")
    assert streamed.path == tmp_path / "streamed" and streamed.files == [streamed.path / "model.safetensors"]
    streamed_header, built_header = _header(streamed.files[0]), _header(built / "model.safetensors")
    assert {k: (v["dtype"], v["shape"]) for k, v in streamed_header.items()} == {
        k: (v["dtype"], v["shape"]) for k, v in built_header.items()
    }
    assert streamed.n_bytes == sum(e.numel() * 4 for e in _tensors(built))
    config = json.loads((streamed.path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    assert (streamed.path / "tokenizer.json").is_file()


def test_streamed_sharded_tied_checkpoint_loads_identically_both_ways(tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tmp_path / "m", "tiny", tie=True, max_shard_size="100KB")
    index = json.loads((checkpoint.path / "model.safetensors.index.json").read_text())
    assert len(checkpoint.files) > 2 and sorted(set(index["weight_map"].values())) == [f.name for f in checkpoint.files]
    assert index["metadata"]["total_size"] == checkpoint.n_bytes
    assert "lm_head.weight" not in index["weight_map"]
    reference = PretrainedLoader().load("ref", checkpoint.path, device="cpu", dtype="bfloat16")
    fast = FastSafetensorsLoader().load("fast", checkpoint.path, device="cpu", dtype="bfloat16")
    assert torch.equal(outputs(fast.module, sample_inputs()), outputs(reference.module, sample_inputs()))
    weights = reference.module.model.embed_tokens.weight
    assert weights.abs().max().item() < 0.2 and weights.std().item() > 0.01  # small normals, not zeros


def _tensors(path: Path) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    return list(load_file(str(path / "model.safetensors")).values())
