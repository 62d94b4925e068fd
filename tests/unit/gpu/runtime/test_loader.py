"""The fast safetensors loader gives bit-identical models to ``from_pretrained``, and says when it falls back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from gpufleet.gpu.checkpoint_format import read_header, weight_files
from gpufleet.gpu.errors import LoadFailedError
from gpufleet.gpu.runtime.inference import embed
from gpufleet.gpu.runtime.loader import FastSafetensorsLoader, PretrainedLoader, ProgressFn
from gpufleet.gpu.runtime.model import LoadedModel
from gpufleet.workers.tools.checkpoints import make_checkpoint, outputs, sample_inputs
from gpufleet.workers.tools.demo_models import DEMO_CHAT_ID, DEMO_EMBEDDING_ID
from gpufleet.workers.tools.tokenizer import save_tokenizer

# Small chunks, so tensors are cut into several reads (and the dtype-converting path is cut too).
SMALL_CHUNKS = {"staging_bytes": 2 * 2 * 8192, "read_threads": 2}


def assert_same_model(fast: LoadedModel, reference: LoadedModel) -> None:
    """Identical outputs, state dicts and buffers (values and dtypes)."""
    assert torch.equal(outputs(fast.module, sample_inputs()), outputs(reference.module, sample_inputs()))
    fast_state, ref_state = fast.module.state_dict(), reference.module.state_dict()
    assert fast_state.keys() == ref_state.keys()
    for key, value in ref_state.items():
        assert fast_state[key].dtype == value.dtype, key
        assert torch.equal(fast_state[key], value), key
    fast_buffers, ref_buffers = dict(fast.module.named_buffers()), dict(reference.module.named_buffers())
    assert fast_buffers.keys() == ref_buffers.keys()
    for key, value in ref_buffers.items():
        assert fast_buffers[key].dtype == value.dtype and torch.equal(fast_buffers[key], value), key
    assert fast.bytes == reference.bytes
    assert fast.kind is reference.kind and fast.pooling is reference.pooling


CASES: dict[str, tuple[dict[str, Any], str]] = {
    "llama-fp32": ({"arch": "llama"}, "float32"),
    "llama-bf16": ({"arch": "llama", "dtype": "bfloat16"}, "bfloat16"),
    "llama-fp32-served-bf16": ({"arch": "llama"}, "bfloat16"),
    "llama-tied": ({"arch": "llama", "tie": True}, "float32"),
    "llama-sharded": ({"arch": "llama", "max_shard_size": "100KB"}, "float32"),
    "gpt2-tied": ({"arch": "gpt2"}, "float32"),
    "bert": ({"arch": "bert"}, "float32"),
    "qwen2-fp16": ({"arch": "qwen2"}, "float16"),
    "mistral": ({"arch": "mistral"}, "float32"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fast_load_is_identical_to_from_pretrained(case: str, tmp_path: Path) -> None:
    options, dtype = CASES[case]
    path = make_checkpoint(tmp_path / case, **options)

    reference = PretrainedLoader().load(case, path, device="cpu", dtype=dtype)
    fast = FastSafetensorsLoader(**SMALL_CHUNKS).load(case, path, device="cpu", dtype=dtype)

    assert fast.loader == "fast-safetensors"
    assert_same_model(fast, reference)
    assert not any(p.device.type == "meta" for p in fast.module.parameters())
    if options.get("tie") or options["arch"] == "gpt2":
        assert fast.module.get_output_embeddings().weight is fast.module.get_input_embeddings().weight
    if options.get("max_shard_size"):
        assert len(weight_files(path).safetensors) > 1


@pytest.mark.parametrize("arch", ["gpt_neox", "phi3"])
def test_transformers_renamed_keys_load_fast(arch: str, tmp_path: Path) -> None:
    # GPT-NeoX checkpoints say embed_out, transformers 5 modules say lm_head: renamed with transformers' table.
    path = make_checkpoint(tmp_path / arch, arch)
    reference = PretrainedLoader().load(arch, path, device="cpu", dtype="bfloat16")
    fast = FastSafetensorsLoader().load(arch, path, device="cpu", dtype="bfloat16")
    assert fast.loader == "fast-safetensors"
    assert_same_model(fast, reference)


def test_demo_models_load_fast_and_answer_the_same(model_root: Path) -> None:
    for model_id in (DEMO_EMBEDDING_ID, DEMO_CHAT_ID):
        path = model_root / model_id
        reference = PretrainedLoader().load(model_id, path, device="cpu", dtype="float32")
        fast = FastSafetensorsLoader().load(model_id, path, device="cpu", dtype="float32")
        assert fast.loader == "fast-safetensors", model_id
        assert_same_model(fast, reference)
    # MiniLM's checkpoint carries a stale position_ids buffer: ignored, as from_pretrained ignores it.
    path = model_root / DEMO_EMBEDDING_ID
    minilm = FastSafetensorsLoader().load(DEMO_EMBEDDING_ID, path, device="cpu", dtype="float32")
    minilm_ref = PretrainedLoader().load(DEMO_EMBEDDING_ID, path, device="cpu", dtype="float32")
    assert minilm.extra["unexpected_keys"] == 1
    assert embed(minilm, ["fast loading"]) == embed(minilm_ref, ["fast loading"])


def test_checkpoint_with_base_model_prefix_loads_into_the_base_model(tmp_path: Path) -> None:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    )
    path = tmp_path / "bert-cls"
    tf.BertForSequenceClassification(config).save_pretrained(str(path))  # keys start with "bert."
    save_tokenizer(path)

    reference = PretrainedLoader().load("cls", path, device="cpu", dtype="float32")
    fast = FastSafetensorsLoader().load("cls", path, device="cpu", dtype="float32")

    assert type(fast.module).__name__ == "BertModel"
    assert fast.loader == "fast-safetensors"
    assert fast.extra["unexpected_keys"] == 2  # classifier.weight, classifier.bias
    assert_same_model(fast, reference)


def test_progress_reports_increasing_bytes_up_to_the_total(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "m", "llama", max_shard_size="100KB")
    calls: list[tuple[int, int]] = []
    FastSafetensorsLoader(**SMALL_CHUNKS).load(
        "m", path, device="cpu", dtype="float32", progress=lambda done, total: calls.append((done, total))
    )
    total = sum(e.nbytes for f in weight_files(path).safetensors for e in read_header(f).values())
    assert len(calls) > 3
    assert all(t == total for _, t in calls)
    done = [d for d, _ in calls]
    assert done == sorted(set(done)) and done[-1] == total


def test_pretrained_loader_reports_completion(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "m", "llama")
    calls: list[tuple[int, int]] = []
    loaded = PretrainedLoader().load(
        "m", path, device="cpu", dtype="float32", progress=lambda d, t: calls.append((d, t))
    )
    assert calls == [(loaded.bytes, loaded.bytes)]


class RecordingLoader:
    """A fallback that records the call and returns a stand-in model (no weights needed)."""

    name = "from_pretrained"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def load(
        self, model_id: str, path: Path, *, device: str, dtype: str, progress: ProgressFn | None = None
    ) -> LoadedModel:
        from gpufleet.gpu.runtime.model import ModelKind

        self.calls.append(model_id)
        return LoadedModel(model_id, path, ModelKind.CAUSAL_LM, None, None, device, dtype, 0, self.name)


def _edit_config(path: Path, **changes: Any) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_pytorch_bin_only_falls_back_and_says_so(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "bin", "llama")
    state = PretrainedLoader().load("bin", path, device="cpu", dtype="float32").module.state_dict()
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")

    fast = FastSafetensorsLoader().load("bin", path, device="cpu", dtype="float32")

    assert fast.loader == "from_pretrained (fallback: no safetensors weights)"
    assert torch.equal(
        outputs(fast.module, sample_inputs()),
        outputs(PretrainedLoader().load("bin", path, device="cpu", dtype="float32").module, sample_inputs()),
    )


class _RunsCode:
    """A pickle that would call a function when loaded: torch's weights-only loader must refuse it."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (print, ("pickle code ran",))


def test_a_pickle_that_runs_code_is_refused_as_a_load_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pickle

    path = make_checkpoint(tmp_path / "evil", "llama")
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": _RunsCode()}))
    for loader in (PretrainedLoader(), FastSafetensorsLoader()):
        with pytest.raises(LoadFailedError, match=r"could not load 'evil'"):
            loader.load("evil", path, device="cpu", dtype="float32")
    assert "pickle code ran" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}},
            "quantized checkpoint (bitsandbytes)",
        ),
        ({"auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}, "custom code architecture (auto_map)"),
    ],
)
def test_unhandled_configs_take_the_fallback(change: dict[str, Any], reason: str, tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "m", "llama")
    _edit_config(path, **change)
    fallback = RecordingLoader()

    loaded = FastSafetensorsLoader(fallback=fallback).load("m", path, device="cpu", dtype="float32")

    assert fallback.calls == ["m"]
    assert loaded.loader == f"from_pretrained (fallback: {reason})"


def test_missing_weights_take_the_fallback(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = make_checkpoint(tmp_path / "m", "llama")
    state = load_file(str(path / "model.safetensors"))
    del state["model.norm.weight"]
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    fallback = RecordingLoader()

    loaded = FastSafetensorsLoader(fallback=fallback).load("m", path, device="cpu", dtype="float32")

    assert fallback.calls == ["m"]
    assert "not found in the checkpoint" in loaded.loader and "model.norm.weight" in loaded.loader


def test_truncated_file_is_a_load_error(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "m", "llama")
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(LoadFailedError, match="truncated"):
        FastSafetensorsLoader().load("m", path, device="cpu", dtype="float32")


def test_header_parser_agrees_with_safetensors(tmp_path: Path) -> None:
    from safetensors import safe_open

    path = make_checkpoint(tmp_path / "m", "llama", dtype="bfloat16")
    entries = read_header(path / "model.safetensors")
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        assert set(handle.keys()) == set(entries)
        for key in entries:
            tensor = handle.get_tensor(key)
            assert entries[key].shape == tuple(tensor.shape) and entries[key].dtype == "BF16"
            with (path / "model.safetensors").open("rb") as raw:
                raw.seek(entries[key].offset)
                assert raw.read(entries[key].nbytes) == tensor.contiguous().view(torch.uint8).numpy().tobytes()


def test_too_small_staging_is_refused() -> None:
    with pytest.raises(LoadFailedError, match="too small"):
        FastSafetensorsLoader(staging_bytes=1024, read_threads=4)
