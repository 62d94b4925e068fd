"""A second embedding family (XLM-RoBERTa) and a multimodal checkpoint's text generation are served."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from gpufleet.gpu.errors import ForwardError
from gpufleet.gpu.runtime.inference import embed, generate
from gpufleet.gpu.runtime.loader import FastSafetensorsLoader, PretrainedLoader
from gpufleet.gpu.runtime.model import ModelKind
from gpufleet.gpu.runtime.options import GenerateOptions
from gpufleet.workers.tools.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("families")
    make_checkpoint(base / "xlmr", "xlm-roberta")
    make_checkpoint(base / "vl", "qwen2_vl")
    return base


def test_xlm_roberta_embeds_through_the_fast_loader(root: Path) -> None:
    fast = FastSafetensorsLoader().load("org/xlmr", root / "xlmr", device="cpu", dtype="float32")
    reference = PretrainedLoader().load("org/xlmr", root / "xlmr", device="cpu", dtype="float32")
    assert fast.loader == "fast-safetensors" and fast.kind is ModelKind.EMBEDDING
    assert type(fast.module).__name__ == "XLMRobertaModel"
    texts = ["The train left the station.", "Une phrase en français.", "x " * 600]  # the last is truncated
    vectors = embed(fast, texts)
    assert len(vectors) == 3 and all(len(v) == 128 for v in vectors)
    assert all(abs(math.hypot(*v) - 1) < 1e-5 for v in vectors)
    for got, want in zip(vectors, embed(reference, texts), strict=True):
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-5


def test_multimodal_checkpoint_serves_text_generation(root: Path) -> None:
    loaded = FastSafetensorsLoader().load("org/vl", root / "vl", device="cpu", dtype="float32")
    assert "multimodal" in loaded.loader and loaded.kind is ModelKind.CAUSAL_LM
    assert type(loaded.module).__name__ == "Qwen2VLForConditionalGeneration"
    # The whole checkpoint is resident, vision tower included.
    assert any("visual" in name for name, _ in loaded.module.named_parameters())
    first = generate(loaded, GenerateOptions(prompt="The weather", max_new_tokens=5))
    again = generate(loaded, GenerateOptions(prompt="The weather", max_new_tokens=5))
    assert first == again and 0 < first.completion_tokens <= 5
    chat = generate(loaded, GenerateOptions(messages=[{"role": "user", "content": "Hi!"}], max_new_tokens=3))
    assert chat.prompt_tokens > first.prompt_tokens
    # The context limit comes from the text config (the top-level multimodal config has none).
    with pytest.raises(ForwardError, match="exceeds the model's context of 2048"):
        generate(loaded, GenerateOptions(prompt="The weather", max_new_tokens=2048))
