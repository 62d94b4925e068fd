"""GGUF models are served dequantized through transformers: same weights, tokenizer from the file's metadata."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from gpufleet.gpu.errors import LoadFailedError
from gpufleet.gpu.plan.estimate import estimate_weights_bytes
from gpufleet.gpu.plan.specs import load_spec
from gpufleet.gpu.repository import resolve_model
from gpufleet.gpu.runtime.inference import generate
from gpufleet.gpu.runtime.loader import FastSafetensorsLoader, PretrainedLoader
from gpufleet.gpu.runtime.model import ModelKind, detect_kind, gguf_model_file, is_gguf_model
from gpufleet.gpu.runtime.options import GenerateOptions
from gpufleet.workers.tools.checkpoints import make_checkpoint, outputs, sample_inputs
from gpufleet.workers.tools.gguf_export import make_gguf_model
from gpufleet.workers.tools.tokenizer import demo_tokenizer


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("gguf-models")
    make_gguf_model(base / "org" / "q8")
    make_gguf_model(base / "org" / "f32", tensor_type="F32")
    make_checkpoint(base / "org" / "hf", "llama", seed=0)
    return base


def test_resolves_and_detects_a_gguf_directory(root: Path) -> None:
    resolved = resolve_model("org/q8", root)
    assert is_gguf_model(resolved.path) and not (resolved.path / "config.json").exists()
    assert detect_kind(resolved.path) is ModelKind.CAUSAL_LM
    assert gguf_model_file(resolved.path).name == "model.Q8_0.gguf"
    assert not is_gguf_model(root / "org" / "hf")


def test_f32_gguf_has_the_checkpoints_weights(root: Path) -> None:
    reference = PretrainedLoader().load("org/hf", root / "org" / "hf", device="cpu", dtype="float32")
    loaded = FastSafetensorsLoader().load("org/f32", root / "org" / "f32", device="cpu", dtype="float32")
    assert "GGUF" in loaded.loader and loaded.kind is ModelKind.CAUSAL_LM
    torch.testing.assert_close(outputs(loaded.module, sample_inputs()), outputs(reference.module, sample_inputs()))


def test_q8_gguf_is_dequantized_to_the_serving_dtype_and_planned_so(root: Path) -> None:
    reference = PretrainedLoader().load("org/hf", root / "org" / "hf", device="cpu", dtype="float32")
    progress: list[tuple[int, int]] = []
    loaded = PretrainedLoader().load(
        "org/q8", root / "org" / "q8", device="cpu", dtype="bfloat16", progress=lambda d, t: progress.append((d, t))
    )
    assert {p.dtype for p in loaded.module.parameters()} == {torch.bfloat16}
    assert progress == [(loaded.bytes, loaded.bytes)]
    planned = estimate_weights_bytes(load_spec(root / "org" / "q8"), dtype_bytes=2)
    # Measured = parameters + the rotary buffer; the plan counts parameters (a few hundred bytes short).
    assert planned <= loaded.bytes <= planned * 1.01
    q8 = outputs(loaded.module, sample_inputs()).float()
    ref = outputs(reference.module, sample_inputs())
    assert (q8 - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_tokenizer_comes_from_the_gguf_metadata(root: Path) -> None:
    loaded = PretrainedLoader().load("org/q8", root / "org" / "q8", device="cpu", dtype="float32")
    demo = demo_tokenizer()
    text = "The morning train left the station."
    assert loaded.tokenizer(text)["input_ids"] == demo(text)["input_ids"]
    assert loaded.tokenizer.chat_template == demo.chat_template
    chat = generate(loaded, GenerateOptions(messages=[{"role": "user", "content": "Hello!"}], max_new_tokens=4))
    assert chat.prompt_tokens > 4 and 0 < chat.completion_tokens <= 4


def test_split_gguf_is_refused_with_what_to_do(tmp_path: Path, root: Path) -> None:
    source = gguf_model_file(root / "org" / "q8").read_bytes()
    for part in (1, 2):
        (tmp_path / f"m-{part:05d}-of-00002.gguf").write_bytes(source)
    with pytest.raises(LoadFailedError, match=r"split in 2 parts.*--merge"):
        FastSafetensorsLoader().load("org/split", tmp_path, device="cpu", dtype="float32")


def test_missing_gguf_package_is_named(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(LoadFailedError, match=r"needs the `gguf` package.*gpufleet\[worker\]"):
        PretrainedLoader().load("org/q8", root / "org" / "q8", device="cpu", dtype="float32")
