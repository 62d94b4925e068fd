"""The OOM policy on a real runtime: real OOMs come out of real forwards (a forward hook raises torch's own error),
:mod:`gpufleet.gpu.runtime` translates them, and the policy evicts, retries once, re-routes, then refuses."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gpufleet.gpu.errors import DeviceOutOfMemoryError
from gpufleet.gpu.runtime.inference import generate
from gpufleet.gpu.runtime.loader import ModelLoader
from gpufleet.gpu.runtime.model import LoadedModel
from gpufleet.gpu.runtime.options import GenerateOptions
from gpufleet.tasks.errors import CapacityError
from gpufleet.workers.child.faults import Faults
from gpufleet.workers.child.oom_policy import MAX_OOM_HOPS, run_with_oom_policy
from gpufleet.workers.child.rerouting import Onward
from gpufleet.workers.child.runtime import WorkerRuntime, default_loader
from tests.support.runtimes import cpu_runtime, cpu_settings


class CountingLoader:
    """The real loader, counting its loads (to check how often a persistent OOM reloads)."""

    def __init__(self, inner: ModelLoader) -> None:
        self.inner = inner
        self.loads = 0
        self.name = "counting"

    def load(self, *args: Any, **kwargs: Any) -> LoadedModel:
        self.loads += 1
        return self.inner.load(*args, **kwargs)


class Rerouted(Exception):
    """Stands for Celery's ``Task.replace`` ending the run."""


def runtime_with(root: Path, tmp_path: Path, faults: str) -> tuple[WorkerRuntime, CountingLoader]:
    loader = CountingLoader(default_loader(cpu_settings(tmp_path, model_root=root)))
    runtime = cpu_runtime(tmp_path, model_root=root, diagnostics=True, loader=loader, faults=Faults.parse(faults))
    return runtime, loader


def generate_step(runtime: WorkerRuntime, model: str) -> Any:
    def step() -> Any:
        acquired = runtime.acquire(model)
        runtime.faults.arm("infer", model, acquired.loaded.module)
        return generate(acquired.loaded, GenerateOptions(prompt="hello", max_new_tokens=2))

    return step


def reroute(onward: Onward) -> Any:
    raise Rerouted(onward.queue)


BIGGER = Onward("gpu.t4", "a live worker with more memory")


def test_oom_in_a_jobs_forward_evicts_and_retries_once(tiny_model_root: Path, tmp_path: Path) -> None:
    runtime, _ = runtime_with(tiny_model_root, tmp_path, "oom:infer:org/a:1")
    runtime.acquire("org/b")  # resident and unpinned: the OOM path evicts it
    with pytest.raises(DeviceOutOfMemoryError, match="out of memory"):
        generate_step(runtime, "org/a")()  # what the policy sees: the translated, real error
    runtime.faults = Faults.parse("oom:infer:org/a:1")
    output = run_with_oom_policy(
        generate_step(runtime, "org/a"),
        model="org/a",
        runtime=runtime,
        hops_done=0,
        next_queue=lambda: BIGGER,
        reroute=reroute,
    )
    assert output.completion_tokens >= 1
    assert runtime.cache is not None and "org/b" not in runtime.cache
    assert runtime.cache.stats().to_dict()["evictions"] >= 2  # org/b, and org/a itself before the retry


def test_persistent_load_oom_loads_twice_then_reroutes(tiny_model_root: Path, tmp_path: Path) -> None:
    runtime, loader = runtime_with(tiny_model_root, tmp_path, "oom:load:org/a:9")
    with pytest.raises(Rerouted, match=r"gpu\.t4"):
        run_with_oom_policy(
            lambda: runtime.acquire("org/a"),
            model="org/a",
            runtime=runtime,
            hops_done=0,
            next_queue=lambda: BIGGER,
            reroute=reroute,
        )
    assert loader.loads == 2, "one load, one retry after eviction: never more"


@pytest.mark.parametrize("hops_done", [0, MAX_OOM_HOPS])
def test_no_larger_gpu_left_gives_a_capacity_error(tiny_model_root: Path, tmp_path: Path, hops_done: int) -> None:
    runtime, _ = runtime_with(tiny_model_root, tmp_path, "oom:infer:org/a:9")
    with pytest.raises(CapacityError, match=r"quantized variant of 'org/a'") as raised:
        run_with_oom_policy(
            generate_step(runtime, "org/a"),
            model="org/a",
            runtime=runtime,
            hops_done=hops_done,
            next_queue=lambda: Onward(None, "no live worker is larger") if hops_done == 0 else BIGGER,
            reroute=reroute,
        )
    assert f"after {hops_done} re-route(s)" in str(raised.value)
    why = "no live worker is larger" if hops_done == 0 else f"re-sent for lack of memory {MAX_OOM_HOPS} time(s)"
    assert why in str(raised.value), "the refusal says why nothing larger was tried"


def test_idle_models_expire_but_never_under_a_running_job(tiny_model_root: Path, tmp_path: Path) -> None:
    runtime = cpu_runtime(tmp_path, model_root=tiny_model_root, gpu={"memory_pool": {"idle_ttl_s": 0.05}})
    assert runtime.cache is not None

    def expire_from_another_thread() -> list[str]:  # as the expiry thread does
        result: list[list[str]] = []
        thread = threading.Thread(target=lambda: result.append(runtime.expire_idle()))
        thread.start()
        thread.join()
        return result[0]

    try:
        with runtime.serving():
            runtime.acquire("org/a")  # longer than the TTL on a busy machine: must not be evicted mid-load
            time.sleep(0.3)  # past the TTL and at least one tick of the expiry thread
            assert expire_from_another_thread() == [], "a running job holds its model"
            assert "org/a" in runtime.cache
        deadline = time.monotonic() + 5
        while "org/a" in runtime.cache and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "org/a" not in runtime.cache, "the expiry thread evicts an idle model once no job runs"
    finally:
        runtime.stop()
