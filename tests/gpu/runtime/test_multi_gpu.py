"""Workers owning several GPUs on real CUDA devices (skipped without CUDA; the split needs two GPUs).

With one GPU: ``--gpus 0`` names, binds and loads exactly as ``--gpu 0`` does, and the device-map loader keeps a
model that fits GPU 0 on the fast loader. With two or more: a model too big for one budget is split across
the GPUs, answers as it does on one device, and the worker's budget is the sum of its GPUs'.
Run on a GPU host with `pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from gpufleet.gpu.runtime.device_map import DeviceMapLoader, planned_bytes
from gpufleet.gpu.runtime.inference import generate
from gpufleet.gpu.runtime.loader import FastSafetensorsLoader, PretrainedLoader
from gpufleet.gpu.runtime.options import GenerateOptions
from gpufleet.tasks.settings import load_settings
from gpufleet.workers.child.runtime import WorkerRuntime
from gpufleet.workers.common.identity import WorkerIdentity
from gpufleet.workers.tools.checkpoints import make_checkpoint
from gpufleet.workers.tools.shapes import Shape

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")

LAYERED = Shape(hidden=256, layers=8, heads=4, kv_heads=2, intermediate=1024, shard_size="8MiB")

IDENTITY_IN_A_FRESH_PARENT = """
import json, os, sys
from gpufleet.workers.main import build_identity
identity = build_identity(gpu={gpu!r}, gpus={gpus!r}, cpu=False, name=None)
print(json.dumps({{"identity": repr(identity), "queues": identity.queues, "devices": identity.devices,
    "visible": os.environ["CUDA_VISIBLE_DEVICES"], "torch_imported": "torch" in sys.modules}}))
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("multi-gpu-models")
    make_checkpoint(base / "org" / "layered", "llama", size=LAYERED)
    return base


def identity_in_subprocess(*, gpu: int | None = None, gpus: str | None = None) -> dict[str, Any]:
    code = IDENTITY_IN_A_FRESH_PARENT.format(gpu=gpu, gpus=gpus)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_gpus_zero_is_gpu_zero_through_real_nvml() -> None:
    single = identity_in_subprocess(gpu=0)
    assert identity_in_subprocess(gpus="0") == single
    assert single["visible"] == "0" and single["devices"] == ["cuda:0"] and single["torch_imported"] is False


def runtime_on(identity: WorkerIdentity, root: Path, tmp_path: Path, **gpu: Any) -> WorkerRuntime:
    settings = load_settings(model_root=root, worker={"state_dir": tmp_path}, gpu={"warmup": {"size": "small"}, **gpu})
    runtime = WorkerRuntime(identity, settings)
    runtime.start()
    return runtime


def cuda_identity(count: int) -> WorkerIdentity:
    props = torch.cuda.get_device_properties(0)
    name = props.name if count == 1 else f"{count}x {props.name}"
    total = sum(int(torch.cuda.get_device_properties(i).total_memory) for i in range(count))
    return WorkerIdentity(f"gpu-test-{count}@test", "h100", "cuda:0", 0, name, total, tuple(range(count)))


def test_gpus_zero_loads_like_gpu_zero(root: Path, tmp_path: Path) -> None:
    runtime = runtime_on(cuda_identity(1), root, tmp_path, memory_fraction=0.5)
    assert runtime.identity.gpu_count == 1 and isinstance(runtime.loader, FastSafetensorsLoader)
    total = torch.cuda.get_device_properties(0).total_memory
    assert runtime.pool is not None and runtime.pool.device_budgets_bytes == (runtime.pool.budget_bytes,)
    assert runtime.pool.budget_bytes == pytest.approx(0.5 * total, rel=0.01)
    loaded = runtime.acquire("org/layered").loaded
    assert loaded.loader == "fast-safetensors" and loaded.device == "cuda:0"
    assert {str(p.device) for p in loaded.module.parameters()} == {"cuda:0"}


def test_device_map_loader_keeps_a_model_that_fits_gpu_0_on_the_fast_loader(root: Path) -> None:
    path = root / "org" / "layered"
    loaded = DeviceMapLoader(lambda: [10**12], single=FastSafetensorsLoader()).load(
        "layered", path, device="cuda:0", dtype="bfloat16"
    )
    assert loaded.loader.startswith("fast-safetensors (whole model on GPU 0")
    assert loaded.extra["device_bytes"] == {0: loaded.bytes}


@two_gpus
def test_a_model_too_big_for_one_gpu_budget_is_split_and_answers_the_same(root: Path) -> None:
    path = root / "org" / "layered"
    budgets = [planned_bytes(path, "float32") * 3 // 4] * 2
    split = DeviceMapLoader(lambda: budgets).load("layered", path, device="cuda:0", dtype="float32")
    assert split.loader == "from_pretrained (device map over GPUs 0,1)" and split.device == "cuda:0"
    assert {str(p.device) for p in split.module.parameters()} == {"cuda:0", "cuda:1"}
    assert all(split.extra["device_bytes"][i] <= budgets[i] for i in (0, 1))
    whole = PretrainedLoader().load("layered", path, device="cuda:0", dtype="float32")
    ids = whole.tokenizer("the quick brown fox", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        expected = whole.module(ids.to("cuda:0")).logits.float().cpu()
        got = split.module(ids.to(split.device)).logits.float().cpu()
    torch.testing.assert_close(got, expected)
    # Generation feeds the first GPU; accelerate's hooks carry the activations to the second and back.
    answer = generate(split, GenerateOptions(prompt="hello", max_new_tokens=8))
    assert (
        answer.completion_tokens > 0
        and answer.text == generate(whole, GenerateOptions(prompt="hello", max_new_tokens=8)).text
    )


@two_gpus
def test_a_two_gpu_runtime_budgets_both_and_splits(root: Path, tmp_path: Path) -> None:
    path = root / "org" / "layered"
    per_gpu = planned_bytes(path, "bfloat16") * 3 // 4
    runtime = runtime_on(cuda_identity(2), root, tmp_path, memory_pool={"budget_bytes": per_gpu})
    assert runtime.pool is not None and runtime.pool.device_budgets_bytes == (per_gpu, per_gpu)
    assert runtime.pool.budget_bytes == 2 * per_gpu and runtime.parked is None
    acquired = runtime.acquire("org/layered")
    assert acquired.loaded.loader == "from_pretrained (device map over GPUs 0,1)"
    assert {str(p.device) for p in acquired.loaded.module.parameters()} == {"cuda:0", "cuda:1"}
    assert runtime.pool.reservations() == {} and sum(runtime.gpu_free_budgets()) < 2 * per_gpu
