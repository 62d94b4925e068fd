"""Exact plans from safetensors headers: bytes and parameters, quantized layouts included, through the CLI too."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, cast

import pytest

from gpufleet.gpu.checkpoint_format import read_header
from gpufleet.gpu.errors import ModelSpecError
from gpufleet.gpu.plan.estimate import estimate_weights_bytes
from gpufleet.gpu.plan.model_spec import SpecSource
from gpufleet.gpu.plan.safetensors_header import weights_from_safetensors
from gpufleet.gpu.plan.specs import spec_from_path

_ELEMENT_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "I32": 4, "I64": 8, "U8": 1, "F8_E4M3": 1}


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> int:
    """A real safetensors file (header + zero data) with these tensors; returns the data bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = _ELEMENT_BYTES[dtype]
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    return offset


def test_gptq_layout_counts_packed_weights_and_side_tensors(tmp_path: Path) -> None:
    tensors = {
        "model.embed_tokens.weight": ("F16", [1000, 256]),
        "model.layers.0.mlp.up_proj.qweight": ("I32", [256 // 8, 1024]),  # 8 4-bit weights per int32
        "model.layers.0.mlp.up_proj.qzeros": ("I32", [256 // 128, 1024 // 8]),
        "model.layers.0.mlp.up_proj.scales": ("F16", [256 // 128, 1024]),
        "model.layers.0.mlp.up_proj.g_idx": ("I32", [256]),
        "model.norm.weight": ("F16", [256]),
    }
    data = _write_safetensors(tmp_path / "model.safetensors", tensors)
    weights = weights_from_safetensors([tmp_path / "model.safetensors"], quantized_bits=4)
    assert weights.tensor_bytes == data
    assert weights.params == 1000 * 256 + 256 * 1024 + 256
    assert weights.float_params == 1000 * 256 + 256
    assert weights.fixed_bytes == data - 2 * (1000 * 256 + 256)  # packed weights and every side tensor as stored
    assert weights.bytes_as_served(None) == data
    assert weights.bytes_as_served(4) == 4 * (1000 * 256 + 256) + weights.fixed_bytes  # fp32: floats double


@pytest.mark.parametrize(
    ("tensors", "bits", "params"),
    [
        # FP8 block-wise: one byte per weight, fp32 inverse scales per 128x128 block.
        ({"w.weight": ("F8_E4M3", [512, 256]), "w.weight_scale_inv": ("F32", [4, 2])}, 8, 512 * 256),
        # MXFP4: two 4-bit weights per byte in blocks of 32, one shared exponent per block.
        ({"e.down_proj_blocks": ("U8", [4, 64, 8, 16]), "e.down_proj_scales": ("U8", [4, 64, 8])}, 4, 4 * 64 * 256),
        # bitsandbytes 4-bit: packed uint8 plus absmax and the quant map.
        (
            {"w.weight": ("U8", [8192, 1]), "w.weight.absmax": ("F32", [256]), "w.weight.quant_map": ("F32", [16])},
            4,
            16384,
        ),
        # compressed-tensors int4: packed int32 plus per-group scales and the original shape.
        (
            {
                "w.weight_packed": ("I32", [128, 32]),
                "w.weight_scale": ("BF16", [128, 2]),
                "w.weight_shape": ("I32", [2]),
            },
            4,
            128 * 256,
        ),
    ],
    ids=["fp8-block", "mxfp4", "bnb-4bit", "compressed-tensors-int4"],
)
def test_quantized_layouts(tmp_path: Path, tensors: dict[str, tuple[str, list[int]]], bits: int, params: int) -> None:
    data = _write_safetensors(tmp_path / "model.safetensors", tensors)
    weights = weights_from_safetensors([tmp_path / "model.safetensors"], quantized_bits=bits)
    assert weights.params == params
    assert weights.tensor_bytes == weights.fixed_bytes == data  # nothing here is converted at load time


def test_integer_buffers_of_an_unquantized_checkpoint_count_bytes_not_parameters(tmp_path: Path) -> None:
    # sentence-transformers' BERT checkpoints save the position_ids buffer (int64) beside the weights.
    tensors = {"embeddings.word_embeddings.weight": ("F32", [1000, 64]), "embeddings.position_ids": ("I64", [1, 512])}
    data = _write_safetensors(tmp_path / "model.safetensors", tensors)
    weights = weights_from_safetensors([tmp_path / "model.safetensors"])
    assert weights.params == weights.float_params == 1000 * 64
    assert weights.tensor_bytes == data and weights.fixed_bytes == 8 * 512


def test_directory_with_sharded_weights_plans_from_the_headers(tmp_path: Path, llama_config: dict[str, Any]) -> None:
    (tmp_path / "config.json").write_text(json.dumps(llama_config))
    first = _write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {"a.weight": ("BF16", [4096, 4096])})
    second = _write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {"b.weight": ("BF16", [4096, 1000])})
    index = {
        "metadata": {"total_size": first + second},
        "weight_map": {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"},
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    spec = spec_from_path(tmp_path)
    assert spec.source is SpecSource.SAFETENSORS
    assert spec.params == 4096 * 5096 and spec.checkpoint_bytes == first + second
    assert spec.notes[0].startswith("parameters: safetensors headers (2 files; formula llama")
    assert estimate_weights_bytes(spec) == first + second
    assert spec.num_layers == 32  # the formula still gives the geometry


def test_index_without_its_shards_says_what_it_used(tmp_path: Path, llama_config: dict[str, Any]) -> None:
    (tmp_path / "config.json").write_text(json.dumps(llama_config))
    index = {
        "metadata": {"total_size": 16_060_522_496},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    spec = spec_from_path(tmp_path)
    assert spec.weights is None and spec.checkpoint_bytes == 16_060_522_496
    assert spec.notes[0] == "parameters: formula llama (llama-style decoder)"
    assert any("total_size (16060522496 bytes); 0 of 2 shard files present" in note for note in spec.notes)


def test_unknown_model_type_with_weights_needs_no_transformers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gpufleet.gpu.plan.general.transformers_available", lambda: False)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "brand_new_lm", "torch_dtype": "bfloat16"}))
    data = _write_safetensors(tmp_path / "model.safetensors", {"w": ("BF16", [1000, 1000])})
    spec = spec_from_path(tmp_path)
    assert spec.params == 1_000_000 and estimate_weights_bytes(spec) == data
    assert spec.notes[0] == "parameters: safetensors headers (1 file)"


@pytest.mark.parametrize(
    ("content", "match"),
    [(b"\x01", "too short"), (struct.pack("<Q", 2**40), "100 MiB limit"), (struct.pack("<Q", 4) + b"{no", "valid")],
)
def test_broken_headers_are_refused(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelSpecError, match=match):
        read_header(path)


def test_unknown_dtype_is_refused(tmp_path: Path) -> None:
    raw = json.dumps({"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0")
    with pytest.raises(ModelSpecError, match="dtype 'F4'"):
        weights_from_safetensors([tmp_path / "model.safetensors"])


def test_cli_plan_reports_the_files_tensor_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`gpufleet plan DIR` on a real checkpoint (saved by transformers) reports its exact tensor bytes."""
    import torch
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    from gpufleet.workers.cli import main

    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        tie_word_embeddings=False,
    )
    cast(Any, LlamaForCausalLM(config)).to(torch.bfloat16).save_pretrained(tmp_path / "tiny", max_shard_size="500KB")
    files = sorted((tmp_path / "tiny").glob("*.safetensors"))
    assert len(files) > 1  # sharded, with an index
    tensor_bytes = params = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = handle.get_tensor(key)
                tensor_bytes += tensor.numel() * tensor.element_size()
                params += tensor.numel()
    assert main(["plan", str(tmp_path / "tiny"), "--json", "--all-types"]) == 0
    placement = json.loads(capsys.readouterr().out)
    assert placement["weights_bytes"] == tensor_bytes
    assert placement["params"] == params
    assert placement["reasons"][0].startswith(f"parameters: safetensors headers ({len(files)} files")
