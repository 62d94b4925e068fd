"""The worker runtime on a real CUDA device: warm-up, budget from the device, eviction to the parked tier and
back (skipped without CUDA). Run on a GPU host with `pytest -m gpu tests/gpu`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpufleet.tasks.settings import load_settings
from gpufleet.workers.child.runtime import WorkerRuntime
from gpufleet.workers.common.identity import WorkerIdentity

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def cuda_identity() -> WorkerIdentity:
    props = torch.cuda.get_device_properties(0)
    return WorkerIdentity("gpu-test-0@test", "h100", "cuda:0", 0, props.name, int(props.total_memory))


@pytest.fixture(scope="module")
def models(tiny_model_root: Path) -> Path:
    return tiny_model_root


def test_warm_up_and_budget_on_the_device(models: Path, tmp_path: Path) -> None:
    settings = load_settings(model_root=models, worker={"state_dir": tmp_path}, gpu={"memory_fraction": 0.5})
    runtime = WorkerRuntime(cuda_identity(), settings)
    runtime.start()
    assert runtime.warmup is not None and runtime.warmup.is_warm
    assert runtime.pool is not None
    total = torch.cuda.get_device_properties(0).total_memory
    assert runtime.pool.budget_bytes == pytest.approx(0.5 * total, rel=0.01)
    acquired = runtime.acquire("org/a")
    assert str(next(acquired.loaded.module.parameters()).device).startswith("cuda")
    stats = runtime.pool.stats()
    # The cache records the measured size; the pool's reservation ended when the load was committed.
    assert stats["resident_bytes"] == acquired.loaded.bytes and stats["reservations"] == {}


def test_evicted_model_parks_and_restores_identically(models: Path, tmp_path: Path) -> None:
    sizes = sorted((models / "org" / n / "model.safetensors").stat().st_size for n in "abc")
    budget = sizes[1] + sizes[2] + sizes[0] // 2  # room for two models, not three
    settings = load_settings(
        model_root=models,
        worker={"state_dir": tmp_path},
        gpu={"memory_pool": {"budget_bytes": budget, "host_budget_bytes": 256 * 2**20}},
    )
    runtime = WorkerRuntime(cuda_identity(), settings)
    runtime.start()
    first = runtime.acquire("org/a").loaded
    ids = first.tokenizer("hello there", return_tensors="pt")["input_ids"].to("cuda:0")
    before = first.module(ids).logits.float().cpu()
    runtime.acquire("org/b")
    runtime.acquire("org/c")
    back = runtime.acquire("org/a")
    assert back.action == "restored"
    after = back.loaded.module(ids).logits.float().cpu()
    assert torch.equal(before, after)
