"""A device that really runs out of memory: the CUDA caching allocator's own out-of-memory error, raised during
a real model load and during a real forward, leaves gpu.runtime as DeviceOutOfMemoryError (skipped without CUDA).

``torch.cuda.set_per_process_memory_fraction`` caps what this process's allocator may reserve; capped near what
it already holds, the next segment it needs beyond that is refused exactly as on a full device.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from gpufleet.gpu.errors import DeviceOutOfMemoryError
from gpufleet.gpu.runtime.inference import embed
from gpufleet.gpu.runtime.loader import FastSafetensorsLoader, ModelLoader, PretrainedLoader
from gpufleet.gpu.units import MiB
from gpufleet.workers.tools.checkpoints import make_checkpoint
from gpufleet.workers.tools.demo_models import DEMO_EMBEDDING_ID, minilm_source_dir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda:0"


@contextmanager
def allocator_capped(extra_bytes: int = 0) -> Iterator[None]:
    """Let the allocator keep what it holds now and reserve at most ``extra_bytes`` more, until the block ends."""
    torch.cuda.synchronize(DEVICE)
    torch.cuda.empty_cache()  # cached free segments would otherwise serve allocations without hitting the cap
    total = torch.cuda.get_device_properties(DEVICE).total_memory
    held = torch.cuda.memory_reserved(DEVICE)
    torch.cuda.set_per_process_memory_fraction(max(held + extra_bytes, 1) / total, DEVICE)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, DEVICE)
        torch.cuda.empty_cache()


@pytest.mark.parametrize("loader", [FastSafetensorsLoader(), PretrainedLoader()], ids=lambda loader: loader.name)
def test_allocator_oom_during_a_real_load(loader: ModelLoader, tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "llama", "llama")
    with allocator_capped(), pytest.raises(DeviceOutOfMemoryError) as info:
        loader.load("test/llama", path, device=DEVICE, dtype="bfloat16")
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert "loading test/llama" in str(info.value)
    loaded = loader.load("test/llama", path, device=DEVICE, dtype="bfloat16")  # the same load fits uncapped
    assert next(loaded.module.parameters()).device.type == "cuda"


def test_allocator_oom_during_a_real_forward() -> None:
    loaded = FastSafetensorsLoader().load(DEMO_EMBEDDING_ID, minilm_source_dir(), device=DEVICE, dtype="float16")
    # 256 texts of 512 tokens: the inputs (3 MB) fit in the 64 MiB left, but one layer's activations alone take
    # about 100 MB, so the allocator refuses inside the forward.
    texts = ["word " * 600] * 256
    with allocator_capped(extra_bytes=64 * MiB), pytest.raises(DeviceOutOfMemoryError) as info:
        embed(loaded, texts)
    cause = info.value.__cause__
    assert isinstance(cause, torch.OutOfMemoryError)
    assert "forward" in {frame.name for frame in traceback.extract_tb(cause.__traceback__)}
    assert DEMO_EMBEDDING_ID in str(info.value)
    vectors = embed(loaded, ["the cap is lifted, so the model answers again"])
    assert len(vectors) == 1 and len(vectors[0]) == 384
