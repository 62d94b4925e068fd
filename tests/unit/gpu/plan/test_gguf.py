"""GGUF headers read in pure Python, and GGUF models planned as served: dequantized, not at the file's size."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import pytest

from gpufleet.gpu.errors import ModelSpecError
from gpufleet.gpu.plan.estimate import estimate_weights_bytes
from gpufleet.gpu.plan.gguf import gguf_files, is_gguf, read_gguf_header, spec_from_gguf_files
from gpufleet.gpu.plan.model_spec import SpecSource
from gpufleet.gpu.plan.specs import load_spec
from gpufleet.workers.tools.checkpoints import make_checkpoint
from gpufleet.workers.tools.gguf_export import make_gguf_model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a Q8_0 GGUF model directory, the safetensors checkpoint with the same weights)."""
    base = tmp_path_factory.mktemp("gguf")
    return make_gguf_model(base / "gguf").parent, make_checkpoint(base / "hf", "llama", seed=0)


def test_header_matches_the_gguf_package_reader(models: tuple[Path, Path]) -> None:
    file = next(models[0].glob("*.gguf"))
    header = read_gguf_header(file)
    reader = gguf.GGUFReader(str(file))
    assert header.version == 3 and header.architecture == "llama"
    assert [(t.name, t.dims, t.ggml_type) for t in header.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), int(t.tensor_type)) for t in reader.tensors
    ]
    assert header.metadata["tokenizer.ggml.tokens"] == len(reader.fields["tokenizer.ggml.tokens"].data)
    assert header.metadata["llama.block_count"] == 2
    assert header.type_counts()["Q8_0"] > 0


def test_spec_counts_every_parameter_and_sizes_them_dequantized(models: tuple[Path, Path]) -> None:
    gguf_dir, hf_dir = models
    spec = load_spec(gguf_dir)
    reference = load_spec(hf_dir)
    assert spec.source is SpecSource.GGUF and spec.exact
    assert spec.quantization is None, "served dequantized: no quantized layers are resident"
    assert spec.params == reference.params
    for field in ("num_layers", "hidden_size", "num_kv_heads", "head_dim", "vocab_size", "tie_word_embeddings"):
        assert getattr(spec, field) == getattr(reference, field), field
    assert spec.max_position_embeddings == reference.max_position_embeddings
    file_bytes = next(gguf_dir.glob("*.gguf")).stat().st_size
    assert spec.checkpoint_bytes == file_bytes
    # The plan sizes the weights at the serving dtype, not the file: fp32 and bf16 both exceed the Q8_0 file.
    assert estimate_weights_bytes(spec, dtype_bytes=4) == spec.params * 4 > file_bytes
    assert estimate_weights_bytes(spec, dtype_bytes=2) == spec.params * 2
    assert any("dequantized" in note for note in spec.notes)


def test_a_gguf_file_path_plans_the_same(models: tuple[Path, Path]) -> None:
    file = next(models[0].glob("*.gguf"))
    assert load_spec(file).params == load_spec(models[0]).params


def test_choosing_the_file(tmp_path: Path, models: tuple[Path, Path]) -> None:
    source = next(models[0].glob("*.gguf")).read_bytes()
    (tmp_path / "b.Q4_K_M.gguf").write_bytes(source)
    (tmp_path / "a.Q8_0.gguf").write_bytes(source)
    (tmp_path / "mmproj-model-f16.gguf").write_bytes(source)
    files, notes = gguf_files(tmp_path)
    assert files == [tmp_path / "a.Q8_0.gguf"] and "a.Q8_0.gguf is the one served" in notes[0]
    spec = load_spec(tmp_path)
    assert spec.name == "a.Q8_0.gguf" and any("is the one served" in note for note in spec.notes)

    split = tmp_path / "split"
    split.mkdir()
    for part in (1, 2):
        (split / f"m-{part:05d}-of-00002.gguf").write_bytes(source)
    files, _ = gguf_files(split)
    assert len(files) == 2
    assert spec_from_gguf_files(files).params == 2 * load_spec(models[0]).params
    assert gguf_files(tmp_path / "split" / "absent")[0] == []


def test_truncated_and_foreign_files_are_refused(tmp_path: Path, models: tuple[Path, Path]) -> None:
    source = next(models[0].glob("*.gguf")).read_bytes()
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(source[:2000])
    with pytest.raises(ModelSpecError, match="truncated or corrupt"):
        read_gguf_header(truncated)
    old = tmp_path / "old.gguf"
    old.write_bytes(b"GGUF" + struct.pack("<I", 1) + bytes(16))
    with pytest.raises(ModelSpecError, match="version 1"):
        read_gguf_header(old)
    big_endian = tmp_path / "be.gguf"
    big_endian.write_bytes(b"GGUF" + struct.pack(">I", 3) + bytes(16))
    with pytest.raises(ModelSpecError, match="big-endian"):
        read_gguf_header(big_endian)
    other = tmp_path / "x.gguf"
    other.write_bytes(b"\0" * 64)
    assert not is_gguf(other)
    with pytest.raises(ModelSpecError, match="not a GGUF file"):
        read_gguf_header(other)
