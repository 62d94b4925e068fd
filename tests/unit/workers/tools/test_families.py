"""The families the checkpoint builder adds: XLM-RoBERTa with a Unigram tokenizer, Qwen2-VL, and GGUF files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpufleet.gpu.errors import ConfigError
from gpufleet.workers.tools.checkpoints import make_checkpoint
from gpufleet.workers.tools.gguf_export import make_gguf_model, write_gguf
from gpufleet.workers.tools.tokenizer import UNIGRAM_SPECIAL_TOKENS, unigram_tokenizer


def test_unigram_tokenizer_has_the_xlm_roberta_layout() -> None:
    tokenizer = unigram_tokenizer()
    assert [tokenizer.convert_ids_to_tokens(i) for i in range(5)] == list(UNIGRAM_SPECIAL_TOKENS)
    ids = tokenizer("The train left the station.")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "The train left the station."
    assert unigram_tokenizer().get_vocab() == tokenizer.get_vocab(), "training is deterministic"


def test_xlm_roberta_config_leaves_room_for_the_padding_offset(tmp_path: Path) -> None:
    config = json.loads((make_checkpoint(tmp_path / "x", "xlm-roberta") / "config.json").read_text())
    assert config["architectures"] == ["XLMRobertaModel"] and config["pad_token_id"] == 1
    assert config["max_position_embeddings"] == 514


def test_qwen2_vl_nests_the_text_model(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "vl", "qwen2_vl")
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Qwen2VLForConditionalGeneration"]
    assert config["text_config"]["hidden_size"] == 128 and config["vision_config"]["depth"] == 1
    assert sum((path / "model.safetensors").stat().st_size for _ in [0]) < 4_000_000


def test_gguf_model_is_one_small_file(tmp_path: Path) -> None:
    file = make_gguf_model(tmp_path / "g", tensor_type="F16")
    assert [p.name for p in (tmp_path / "g").iterdir()] == ["model.F16.gguf"] == [file.name]
    assert file.read_bytes()[:4] == b"GGUF" and file.stat().st_size < 2_000_000


def test_gguf_writer_refuses_what_it_cannot_write(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Q4_K"):
        make_gguf_model(tmp_path / "q4", tensor_type="Q4_K")
    bert = make_checkpoint(tmp_path / "bert", "bert")
    with pytest.raises(ConfigError, match="only llama"):
        write_gguf(bert, tmp_path / "bert.gguf")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("taken")
    with pytest.raises(ConfigError, match="not empty"):
        make_gguf_model(tmp_path / "full")
