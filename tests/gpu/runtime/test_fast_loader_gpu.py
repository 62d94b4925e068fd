"""The fast loader and the parked tier on a real CUDA device (skipped without one)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from gpufleet.gpu.runtime.loader import FastSafetensorsLoader, PretrainedLoader
from gpufleet.gpu.runtime.parking import ParkedStore
from gpufleet.workers.tools.checkpoints import make_checkpoint, outputs, sample_inputs, write_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize(
    ("arch", "saved", "served"),
    [
        ("llama", "bfloat16", "bfloat16"),
        ("llama", "float32", "bfloat16"),  # converted on the device
        ("qwen2", "float32", "float16"),
        ("bert", "float32", "float32"),
    ],
)
def test_identical_outputs_on_cuda(arch: str, saved: str, served: str, tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / arch, arch, dtype=saved, tie=arch == "qwen2", max_shard_size="100KB")
    reference = PretrainedLoader().load(arch, path, device="cuda", dtype=served)
    fast = FastSafetensorsLoader(staging_bytes=2 * 8 * 8192, read_threads=8).load(
        arch, path, device="cuda", dtype=served
    )

    assert fast.loader == "fast-safetensors"
    assert all(t.device.type == "cuda" for t in [*fast.module.parameters(), *fast.module.buffers()])
    assert torch.equal(outputs(fast.module, sample_inputs()), outputs(reference.module, sample_inputs()))
    for key, value in reference.module.state_dict().items():
        assert torch.equal(fast.module.state_dict()[key], value), key


def test_quick_load_beats_from_pretrained_and_parks(tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tmp_path / "small", "small")  # ~285 MB bf16
    loader = FastSafetensorsLoader()
    loader.load("warm", checkpoint.path, device="cuda", dtype="bfloat16")  # staging, CUDA context
    torch.cuda.synchronize()

    started = time.perf_counter()
    reference = PretrainedLoader().load("ref", checkpoint.path, device="cuda", dtype="bfloat16")
    pretrained_s = time.perf_counter() - started
    calls: list[tuple[int, int]] = []
    fast = loader.load(
        "fast", checkpoint.path, device="cuda", dtype="bfloat16", progress=lambda d, t: calls.append((d, t))
    )

    assert fast.loader == "fast-safetensors"
    assert fast.load_s < pretrained_s, (fast.load_s, pretrained_s)
    assert calls[-1] == (checkpoint.n_bytes, checkpoint.n_bytes)
    inputs = {"input_ids": torch.tensor([[1, 2, 3, 4]])}
    expected = outputs(reference.module, inputs)
    assert torch.equal(outputs(fast.module, inputs), expected)

    store = ParkedStore(host_budget_bytes=2 * fast.bytes)
    assert store.park(fast)
    assert fast.device == "cpu" and all(p.device.type == "cpu" and p.is_pinned() for p in fast.module.parameters())
    restored = store.restore("fast", "cuda")
    assert restored is not None and restored.loader == "parked-restore"
    assert all(t.device.type == "cuda" for t in [*restored.module.parameters(), *restored.module.buffers()])
    assert torch.equal(outputs(restored.module, inputs), expected)
