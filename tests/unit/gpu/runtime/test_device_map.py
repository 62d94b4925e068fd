"""Device maps for workers owning several GPUs, planned on the meta device from real tiny checkpoints (no GPU).

The maps are checked against the checkpoints' real sizes; the loader runs the planned map on the CPU (the same
module names ``from_pretrained`` must accept, one device) and must give the logits ``from_pretrained`` gives.
The worker runtime is run as a two-GPU worker would run it, with the CPU standing in for both GPUs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from gpufleet.gpu.errors import BudgetExceededError, ConfigError, LoadFailedError
from gpufleet.gpu.runtime.device_map import DeviceMapLoader, device_bytes, first_device, plan_device_map, planned_bytes
from gpufleet.gpu.runtime.loader import FastSafetensorsLoader, PretrainedLoader
from gpufleet.workers.tools.checkpoints import make_checkpoint
from gpufleet.workers.tools.shapes import Shape

# Blocks small against the model (8 decoder layers of ~0.8 MB in float32), so a split can be even.
LAYERED = Shape(hidden=64, layers=8, heads=4, kv_heads=2, intermediate=1024, shard_size="8MiB")
SHORT = Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=1024, shard_size="8MiB")
MID = Shape(hidden=64, layers=4, heads=4, kv_heads=2, intermediate=1024, shard_size="8MiB")
# Few, large blocks (~1.6 MB each): where what each GPU has free matters, not only the sum.
COARSE = Shape(hidden=64, layers=4, heads=4, kv_heads=2, intermediate=2048, shard_size="8MiB")
ARCHS = ("llama", "gpt2", "bert")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("device-map-models")
    for arch in ARCHS:
        make_checkpoint(base / "org" / arch, arch, size=LAYERED)
    make_checkpoint(base / "org" / "llama-tied", "llama", size=LAYERED, tie=True)
    make_checkpoint(base / "org" / "short", "llama", size=SHORT)
    make_checkpoint(base / "org" / "mid", "llama", size=MID)
    make_checkpoint(base / "org" / "coarse", "llama", size=COARSE)
    return base


def held_by_gpu(model_dir: Path, device_map: dict[str, int | str]) -> dict[int, int]:
    """Bytes the map puts on each GPU, from the checkpoint's real tensors (loaded on the CPU)."""
    module = PretrainedLoader().load("m", model_dir, device="cpu", dtype="float32").module
    return device_bytes(module, device_map)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_model_that_fits_lands_whole_on_gpu_0(root: Path, arch: str) -> None:
    path = root / "org" / arch
    need = planned_bytes(path, "float32")
    assert plan_device_map(path, "float32", [need, 0]) == {"": 0}, "a budget of exactly the model's size is enough"
    assert plan_device_map(path, "float32", [4 * need, 4 * need, 4 * need]) == {"": 0}
    with pytest.raises(BudgetExceededError):
        plan_device_map(path, "float32", [need - 1, 0])


@pytest.mark.parametrize("arch", ARCHS)
def test_a_model_too_big_for_one_gpu_is_spread_in_order(root: Path, arch: str) -> None:
    path = root / "org" / arch
    need = planned_bytes(path, "float32")
    for budgets in ([need * 3 // 4] * 2, [need * 2 // 5] * 4):
        device_map = plan_device_map(path, "float32", budgets)
        devices = list(device_map.values())
        assert len(set(devices)) >= 2, f"{budgets} cannot hold it on one GPU: {device_map}"
        assert devices == sorted(devices), "blocks follow the model's order from GPU to GPU (a pipeline)"
        held = held_by_gpu(path, device_map)
        assert sum(held.values()) > 0 and all(held[gpu] <= budgets[gpu] for gpu in held), (held, budgets)
        # No decoder layer is cut in two: every key is a whole layer or something above one.
        layer_keys = [key for key in device_map if ".layer" in key or ".h." in key]
        assert layer_keys and all(key.split(".")[-1].isdigit() for key in layer_keys), layer_keys


def test_bf16_halves_the_need(root: Path) -> None:
    path = root / "org" / "llama"
    fp32 = planned_bytes(path, "float32")
    assert planned_bytes(path, "bfloat16") == pytest.approx(fp32 / 2, rel=0.01)
    assert len(set(plan_device_map(path, "float32", [fp32 * 3 // 4] * 2).values())) == 2
    assert plan_device_map(path, "bfloat16", [fp32 * 3 // 4] * 2) == {"": 0}


def test_a_model_too_big_for_all_the_gpus_is_refused_clearly(root: Path) -> None:
    path = root / "org" / "llama"
    need = planned_bytes(path, "float32")
    with pytest.raises(BudgetExceededError) as refused:
        plan_device_map(path, "float32", [need // 3, need // 3])
    message = str(refused.value)
    assert "'llama' needs 6.9 MiB in float32" in message and "2 GPU(s)" in message and "left over" in message
    assert "--gpus" in message and "quantized" in message, "it says what to do"


def test_bad_budgets_and_directories_are_refused(root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="one budget per GPU"):
        plan_device_map(root / "org" / "llama", "float32", [])
    with pytest.raises(ConfigError, match=">= 0"):
        plan_device_map(root / "org" / "llama", "float32", [10**9, -1])
    with pytest.raises(LoadFailedError, match=r"config\.json"):
        plan_device_map(tmp_path, "float32", [10**9])


def test_first_device_is_where_the_inputs_go() -> None:
    assert first_device({"model.embed_tokens": 1, "model.layers.0": 1, "lm_head": 2}) == 1
    assert first_device({"": 0}) == 0
    with pytest.raises(ConfigError, match="does not start on a GPU"):
        first_device({"model.embed_tokens": "disk", "lm_head": 0})


def outputs(loaded: Any, text: str = "the quick brown fox") -> torch.Tensor:
    batch = loaded.tokenizer([text], return_tensors="pt").to(loaded.device)
    with torch.inference_mode():
        out = loaded.module(**batch)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


@pytest.mark.parametrize("name", ["llama", "llama-tied", "gpt2", "bert"])
def test_loading_with_a_split_map_gives_from_pretrained_outputs(root: Path, name: str) -> None:
    path = root / "org" / name
    budgets = [planned_bytes(path, "float32") * 3 // 4] * 2
    loader = DeviceMapLoader(lambda: budgets, single=FastSafetensorsLoader())
    loaded = loader.load(name, path, device="cpu", dtype="float32")
    assert loaded.loader == "from_pretrained (device map over GPUs 0,1)"
    held = loaded.extra["device_bytes"]
    assert set(held) == {0, 1} and sum(held.values()) == loaded.bytes
    assert all(held[gpu] <= budgets[gpu] for gpu in held)
    reference = PretrainedLoader().load(name, path, device="cpu", dtype="float32")
    assert torch.equal(outputs(loaded), outputs(reference))


def test_a_model_that_fits_gpu_0_keeps_the_fast_loader(root: Path) -> None:
    path = root / "org" / "llama"
    loader = DeviceMapLoader(lambda: [10**9, 10**9], single=FastSafetensorsLoader())
    loaded = loader.load("llama", path, device="cpu", dtype="float32")
    assert loaded.loader == "fast-safetensors (whole model on GPU 0 of 2)"
    assert loaded.extra["device_map"] == {"": 0} and loaded.extra["device_bytes"] == {0: loaded.bytes}


def test_loading_plans_against_what_the_gpus_have_free_now(root: Path) -> None:
    path = root / "org" / "llama"
    need = planned_bytes(path, "float32")
    free = [need * 2, need * 2]
    loader = DeviceMapLoader(lambda: free)
    assert loader.load("llama", path, device="cpu", dtype="float32").extra["device_map"] == {"": 0}
    free[0] = need // 4  # another model took most of GPU 0 since
    spread = loader.load("llama", path, device="cpu", dtype="float32")
    assert spread.extra["device_bytes"][0] <= need // 4 and spread.extra["device_bytes"][1] > 0
    free[:] = [need // 4, need // 4]
    with pytest.raises(BudgetExceededError):
        loader.load("llama", path, device="cpu", dtype="float32")


# -- the worker runtime of a two-GPU worker, the CPU standing in for both GPUs ----------------------------------


def two_gpu_runtime(root: Path, tmp_path: Path, per_gpu_budget_bytes: int) -> Any:
    from gpufleet.workers.common.identity import WorkerIdentity
    from tests.support.runtimes import cpu_runtime

    identity = WorkerIdentity("cpu-pair@unit", "cpu", "cpu", None, "cpu", 2**34, gpu_indices=(0, 1))
    return cpu_runtime(
        tmp_path, model_root=root, identity=identity, gpu={"memory_pool": {"budget_bytes": per_gpu_budget_bytes}}
    )


def test_runtime_budget_spans_the_gpus_and_splits_what_one_cannot_hold(root: Path, tmp_path: Path) -> None:
    big, small = planned_bytes(root / "org" / "llama", "float32"), planned_bytes(root / "org" / "short", "float32")
    budget = big * 3 // 4
    runtime = two_gpu_runtime(root, tmp_path, budget)
    assert runtime.pool.budget_bytes == 2 * budget and runtime.pool.device_budgets_bytes == (budget, budget)
    assert runtime.cache.capacity_bytes == 2 * budget and runtime.parked is None
    first = runtime.acquire("org/short")
    assert first.loaded.loader == "fast-safetensors (whole model on GPU 0 of 2)"
    assert runtime.gpu_free_budgets() == [budget - small, budget]
    second = runtime.acquire("org/llama")
    assert second.action == "loaded" and second.evicted == ()
    assert second.loaded.loader == "from_pretrained (device map over GPUs 0,1)"
    held = second.loaded.extra["device_bytes"]
    assert held[0] <= budget - small and runtime.gpu_free_budgets() == [budget - small - held[0], budget - held[1]]
    # Reserve and commit work on the summed budget: the cache holds both at their measured sizes.
    assert runtime.pool.reservations() == {} and runtime.cache.used_bytes == small + second.loaded.bytes


def test_runtime_refuses_what_never_fits_before_evicting_anything(root: Path, tmp_path: Path) -> None:
    big = planned_bytes(root / "org" / "llama", "float32")
    runtime = two_gpu_runtime(root, tmp_path, big * 2 // 5)
    runtime.acquire("org/short")
    with pytest.raises(BudgetExceededError, match="do not fit the free budgets of 2 GPU"):
        runtime.acquire("org/llama")
    assert "org/short" in runtime.cache, "nothing is evicted for a model that cannot fit anyway"


def test_runtime_evicts_when_the_sum_fits_but_the_blocks_do_not(root: Path, tmp_path: Path) -> None:
    coarse = root / "org" / "coarse"
    budget = planned_bytes(coarse, "float32") * 4 // 5
    runtime = two_gpu_runtime(root, tmp_path, budget)
    runtime.acquire("org/mid")  # fills most of GPU 0
    free = runtime.gpu_free_budgets()
    # The preconditions that make this the per-GPU case: the summed budget has room, the GPUs one by one do not.
    assert runtime.estimate_bytes(runtime.resolve("org/coarse")) <= sum(free)
    with pytest.raises(BudgetExceededError):
        plan_device_map(coarse, "float32", free)
    acquired = runtime.acquire("org/coarse")
    assert acquired.evicted == ("org/mid",) and "org/mid" not in runtime.cache
    assert set(acquired.loaded.extra["device_bytes"]) == {0, 1}
