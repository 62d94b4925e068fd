"""WorkerRuntime on the CPU with real (tiny) models: budget, eviction, parking, pins, reconciliation."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.gpu.errors import AllPinnedError, ModelNotInstalledError
from gpufleet.workers.child import state
from gpufleet.workers.child.runtime import WorkerRuntime
from tests.support.runtimes import cpu_runtime

MiB = 2**20


@pytest.fixture(scope="module")
def tiny_root(tiny_model_root: Path) -> Path:
    return tiny_model_root


def model_bytes(root: Path, name: str) -> int:
    return (root / "org" / name / "model.safetensors").stat().st_size


def runtime_for(root: Path, tmp_path: Path, **overrides: object) -> WorkerRuntime:
    return cpu_runtime(tmp_path, model_root=root, **overrides)


def two_model_budget(root: Path) -> int:
    """Room for any two of the tiny models but not all three."""
    sizes = sorted(model_bytes(root, n) for n in "abc")
    return sizes[1] + sizes[2] + sizes[0] // 2


def test_hit_after_load_and_measured_size_reconciled(tiny_root: Path, tmp_path: Path) -> None:
    runtime = runtime_for(tiny_root, tmp_path, gpu={"warmup": {"size": "small"}})
    first = runtime.acquire("org/a")
    assert first.action == "loaded" and first.loaded.bytes > 0
    again = runtime.acquire("org/a")
    assert again.action == "already-loaded" and again.loaded is first.loaded
    # The measured size is recorded once, by the cache; the pool's reservation ended with the load.
    assert runtime.cache is not None and runtime.cache.size_of("org/a") == first.loaded.bytes
    assert runtime.pool is not None and runtime.pool.reservations() == {}
    assert runtime.pool.stats()["resident_bytes"] == first.loaded.bytes
    snapshot = state.snapshot(runtime).model_dump()
    assert snapshot["ready"] is True and snapshot["cache"]["stats"]["hits"] == 1
    assert snapshot["models"]["loaded"][0]["model"] == "org/a"


def test_eviction_parks_and_restore_comes_back(tiny_root: Path, tmp_path: Path) -> None:
    runtime = runtime_for(
        tiny_root,
        tmp_path,
        gpu={"memory_pool": {"budget_bytes": two_model_budget(tiny_root), "host_budget_bytes": 64 * MiB}},
    )
    a = runtime.acquire("org/a")
    logits_before = a.loaded.module(a.loaded.tokenizer("hello", return_tensors="pt")["input_ids"]).logits
    runtime.acquire("org/b")
    third = runtime.acquire("org/c")
    assert third.evicted == ("org/a",), "the least recently used model makes room"
    assert runtime.parked is not None and "org/a" in runtime.parked
    back = runtime.acquire("org/a")
    assert back.action == "restored" and back.loaded.loader == "parked-restore"
    logits_after = back.loaded.module(back.loaded.tokenizer("hello", return_tensors="pt")["input_ids"]).logits
    assert (logits_after == logits_before).all()
    assert state.snapshot(runtime).model_dump()["cache"]["parked"]["stats"]["restores"] == 1


def test_pinned_models_are_never_evicted(tiny_root: Path, tmp_path: Path) -> None:
    budget = two_model_budget(tiny_root)
    runtime = runtime_for(tiny_root, tmp_path, gpu={"memory_pool": {"budget_bytes": budget}})
    runtime.acquire("org/a", pinned=True)
    runtime.acquire("org/b", pinned=True)
    with pytest.raises(AllPinnedError, match="org/a"):
        runtime.acquire("org/c")
    assert runtime.cache is not None and {e["key"] for e in runtime.cache.entries()} == {"org/a", "org/b"}
    assert runtime.unload("org/b") is not None
    assert runtime.acquire("org/c").action == "loaded"


def test_priority_models_preload_pinned(tiny_root: Path, tmp_path: Path) -> None:
    runtime = runtime_for(tiny_root, tmp_path, priority_models=("org/b",))
    assert runtime.cache is not None and [e["pinned"] for e in runtime.cache.entries() if e["key"] == "org/b"] == [True]


def test_unknown_model_and_unload_of_absent(tiny_root: Path, tmp_path: Path) -> None:
    runtime = runtime_for(tiny_root, tmp_path)
    with pytest.raises(ModelNotInstalledError):
        runtime.acquire("org/absent")
    assert runtime.unload("org/a") is None
    assert runtime.pool is not None and runtime.pool.reservations() == {}


def test_model_code_is_imported_before_the_first_job(tiny_root: Path, tmp_path: Path) -> None:
    runtime = runtime_for(tiny_root, tmp_path)
    assert {"llama", "qwen2", "mistral"} <= set(runtime.preimported)
    assert state.snapshot(runtime).model_dump()["preimported_model_code"] == runtime.preimported


def test_a_started_runtime_draws_no_transformers_progress_bars(tiny_root: Path, tmp_path: Path) -> None:
    # Celery logs the pool child's stderr at WARNING: a "Loading weights" bar per load was a warning per load.
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.enable_progress_bar()
    try:
        runtime_for(tiny_root, tmp_path)
        assert not transformers_logging.is_progress_bar_enabled()
    finally:
        (transformers_logging.enable_progress_bar if was_enabled else transformers_logging.disable_progress_bar)()
