"""The parked tier: round trips give identical outputs, the budget evicts oldest first (freeing the host copy),
too-big models are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpufleet.gpu.errors import ConfigError
from gpufleet.gpu.runtime.loader import FastSafetensorsLoader
from gpufleet.gpu.runtime.model import LoadedModel
from gpufleet.gpu.runtime.parking import ParkedStore
from gpufleet.workers.tools.checkpoints import make_checkpoint, outputs, sample_inputs


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("parking") / "llama", "llama", tie=True)


def load(checkpoint: Path, model_id: str) -> LoadedModel:
    return FastSafetensorsLoader().load(model_id, checkpoint, device="cpu", dtype="float32")


def test_park_and_restore_round_trip_gives_identical_outputs(checkpoint: Path) -> None:
    loaded = load(checkpoint, "a")
    before = outputs(loaded.module, sample_inputs())
    store = ParkedStore(host_budget_bytes=10 * loaded.bytes)

    assert store.park(loaded)
    assert "a" in store and len(store) == 1 and store.used_bytes == loaded.bytes
    restored = store.restore("a", "cpu")

    assert restored is loaded
    assert restored.loader == "parked-restore" and restored.device == "cpu" and restored.load_s >= 0
    assert torch.equal(outputs(restored.module, sample_inputs()), before)
    assert restored.module.lm_head.weight is restored.module.model.embed_tokens.weight  # still tied
    assert "a" not in store and store.used_bytes == 0
    stats = store.stats()
    assert stats["parks"] == 1 and stats["restores"] == 1 and stats["parked_hits"] == 1 and stats["parked"] == 0


def test_budget_evicts_the_oldest_parked_model(checkpoint: Path) -> None:
    models = [load(checkpoint, name) for name in ("a", "b", "c")]
    store = ParkedStore(host_budget_bytes=2 * models[0].bytes)

    assert all(store.park(m) for m in models)

    assert "a" not in store and "b" in store and "c" in store
    assert [e["model_id"] for e in store.entries()] == ["b", "c"]
    assert store.stats()["evictions"] == 1
    assert store.used_bytes <= store.host_budget_bytes
    entry = store.entries()[0]
    assert entry["bytes"] == models[1].bytes and entry["dtype"] == "float32" and entry["from_device"] == "cpu"
    assert entry["pinned_memory"] is False and entry["parked_for_s"] >= 0  # no CUDA: nothing to page-lock
    # The evicted model's host copy is let go even though this test still holds its LoadedModel.
    assert models[0].module is None
    assert models[1].module is not None and models[2].module is not None


def test_a_model_bigger_than_the_budget_is_refused_without_evicting(checkpoint: Path) -> None:
    small_store = ParkedStore(host_budget_bytes=1000)
    assert not small_store.park(load(checkpoint, "big"))
    assert small_store.stats()["refused"] == 1 and len(small_store) == 0

    model = load(checkpoint, "a")
    store = ParkedStore(host_budget_bytes=model.bytes)
    assert store.park(model)
    assert store.stats()["evictions"] == 0


def test_restore_of_an_unknown_model_is_a_miss_and_drop_forgets(checkpoint: Path) -> None:
    model = load(checkpoint, "a")
    store = ParkedStore(host_budget_bytes=10 * model.bytes)
    assert store.restore("nope", "cpu") is None
    assert store.stats()["parked_misses"] == 1

    store.park(model)
    store.park(model)  # parking the same id again replaces it
    assert len(store) == 1 and store.used_bytes == model.bytes
    assert model.module is not None  # replaced by itself: the module stays
    assert store.drop("a") and not store.drop("a")
    assert store.used_bytes == 0 and store.stats()["budget_bytes"] == 10 * model.bytes
    assert model.module is None  # dropped: its host memory is freed


@pytest.mark.parametrize("budget", [0, -1])
def test_a_budget_that_is_not_positive_is_a_config_error(budget: int) -> None:
    with pytest.raises(ConfigError, match="HOST_BUDGET_BYTES"):
        ParkedStore(host_budget_bytes=budget)
