"""GPUMemoryPool: budgets, reservations of loads in flight, resident bytes read from a real ModelCache, and
stats, over a fake source and the real CPU source alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from gpufleet.gpu.config import GpuConfig, MemoryPoolConfig
from gpufleet.gpu.errors import BudgetExceededError, ConfigError
from gpufleet.gpu.runtime import device_memory
from gpufleet.gpu.runtime.device_memory import (
    ALLOC_CONF_ENV,
    DEFAULT_ALLOC_CONF,
    CpuMemorySource,
    CudaMemorySource,
    MemorySource,
    configure_allocator,
    source_for_device,
)
from gpufleet.gpu.runtime.memory_pool import GPUMemoryPool
from gpufleet.gpu.runtime.model_cache import ModelCache
from gpufleet.gpu.units import GiB, MiB


class FakeSource:
    """A device with fixed figures and a caching allocator holding a little more than it hands out."""

    def __init__(self, total_bytes: int = 80 * GiB) -> None:
        self._total = total_bytes

    def total_bytes(self) -> int:
        return self._total

    def free_bytes(self) -> int:
        return self._total - 3 * GiB

    def allocator_stats(self) -> dict[str, int]:
        return {
            "allocated_bytes": 2 * GiB,
            "reserved_bytes": 3 * GiB,
            "inactive_split_bytes": 10 * MiB,
            "num_alloc_retries": 0,
            "num_ooms": 0,
        }


@pytest.fixture(params=["fake", "cpu"])
def source(request: pytest.FixtureRequest) -> MemorySource:
    """Every test using this runs over the fake source and the real psutil-backed one."""
    return FakeSource() if request.param == "fake" else CpuMemorySource()


@pytest.fixture
def cache() -> ModelCache[str]:
    return ModelCache(1000)


@pytest.fixture
def pool(source: MemorySource, cache: ModelCache[str]) -> GPUMemoryPool:
    """A 1000-byte budget whose resident bytes are what the cache holds, as in the worker."""
    return GPUMemoryPool("cpu", budget_bytes=1000, source=source, resident_bytes=lambda: cache.used_bytes)


def test_sources_satisfy_the_protocol() -> None:
    assert isinstance(FakeSource(), MemorySource)
    assert isinstance(CpuMemorySource(), MemorySource)
    assert isinstance(CudaMemorySource("cuda:0"), MemorySource)


def test_source_for_device() -> None:
    assert isinstance(source_for_device("cpu"), CpuMemorySource)
    cuda = source_for_device("cuda:1")
    assert isinstance(cuda, CudaMemorySource) and cuda.device == "cuda:1"
    with pytest.raises(ConfigError, match="mps"):
        source_for_device("mps")


def test_real_cpu_source_reports_plausible_figures() -> None:
    source = CpuMemorySource()
    assert 0 < source.free_bytes() <= source.total_bytes()
    assert source.allocator_stats()["rss_bytes"] > 0


def test_budget_from_fraction(source: MemorySource) -> None:
    pool = GPUMemoryPool.from_config("cpu", GpuConfig(memory_fraction=0.5), source=source)
    assert pool.budget_bytes == int(source.total_bytes() * 0.5)


def test_budget_override_wins_over_fraction(source: MemorySource) -> None:
    config = GpuConfig(memory_fraction=0.5, memory_pool=MemoryPoolConfig(budget_bytes=123 * MiB))
    assert GPUMemoryPool.from_config("cpu", config, source=source).budget_bytes == 123 * MiB


def test_budget_override_larger_than_device_is_refused(source: MemorySource) -> None:
    config = GpuConfig(memory_pool=MemoryPoolConfig(budget_bytes=source.total_bytes() + 1))
    with pytest.raises(ConfigError, match="BUDGET_BYTES"):
        GPUMemoryPool.from_config("cpu", config, source=source)


def test_disabled_pool_budgets_the_whole_device(source: MemorySource) -> None:
    config = GpuConfig(memory_fraction=0.5, memory_pool=MemoryPoolConfig(enabled=False))
    assert GPUMemoryPool.from_config("cpu", config, source=source).budget_bytes == source.total_bytes()


def test_from_config_default_source_is_real_cpu() -> None:
    pool = GPUMemoryPool.from_config("cpu", GpuConfig())
    assert isinstance(pool.source, CpuMemorySource)
    assert pool.budget_bytes == int(CpuMemorySource().total_bytes() * 0.9)


def test_preallocation_is_a_no_op_on_cpu(source: MemorySource) -> None:
    config = GpuConfig(memory_pool=MemoryPoolConfig(preallocate_common_sizes=True, common_sizes_mb=(1, 2)))
    pool = GPUMemoryPool.from_config("cpu", config, source=source)
    assert pool.stats()["preallocated_mb"] == []
    with pytest.raises(ConfigError):
        pool.preallocate([0])


def test_reserve_commit_release(pool: GPUMemoryPool, cache: ModelCache[str]) -> None:
    pool.reserve("a", 400)
    pool.reserve("b", 300)
    assert (pool.reserved_bytes, pool.resident_bytes, pool.free_bytes) == (700, 0, 300)
    assert pool.reservations() == {"a": 400, "b": 300}
    # The load of "a" measured 450 bytes: the cache records that size, the pool's reservation ends.
    cache.put("a", "A", 450)
    assert pool.commit("a", 450) == 50
    assert pool.reservations() == {"b": 300}
    assert (pool.reserved_bytes, pool.resident_bytes, pool.free_bytes) == (300, 450, 250)
    # The load of "b" failed: releasing is idempotent and frees its reservation.
    assert pool.release("b") == 300
    assert pool.release("b") == 0
    assert pool.reservations() == {} and pool.free_bytes == 550


def test_resident_models_count_against_reservations(pool: GPUMemoryPool, cache: ModelCache[str]) -> None:
    cache.put("resident", "R", 600)
    with pytest.raises(BudgetExceededError, match=r"400 B free of its 1000 B budget \(600 B held by resident models\)"):
        pool.reserve("next", 500)
    pool.reserve("next", 400)
    cache.pop("resident")  # evicted: its bytes are free again without telling the pool
    pool.reserve("other", 600)
    assert pool.reservations() == {"next": 400, "other": 600}


def test_a_size_is_recorded_once(pool: GPUMemoryPool, cache: ModelCache[str]) -> None:
    pool.reserve("a", 100)
    cache.put("a", "A", 120)
    pool.commit("a", 120)
    stats = pool.stats()
    assert (stats["resident_bytes"], stats["reserved_bytes"], stats["reservations"]) == (120, 0, {})
    assert stats["free_bytes"] == 880


def test_pool_without_a_cache_counts_only_reservations(source: MemorySource) -> None:
    pool = GPUMemoryPool("cpu", budget_bytes=1000, source=source)
    pool.reserve("a", 1000)
    assert (pool.resident_bytes, pool.free_bytes) == (0, 0)


def test_reserve_again_replaces(pool: GPUMemoryPool) -> None:
    pool.reserve("a", 900)
    pool.reserve("a", 1000)  # its own old bytes count as free
    assert pool.reservations() == {"a": 1000}


def test_reserve_refused_names_holders_and_changes_nothing(pool: GPUMemoryPool) -> None:
    pool.reserve("org/small", 300)
    pool.reserve("org/medium", 500)
    with pytest.raises(BudgetExceededError) as info:
        pool.reserve("org/big", 300)
    message = str(info.value)
    assert "'org/big' needs 300 B" in message
    assert "200 B free of its 1000 B budget" in message
    assert "800 B reserved by loads in flight" in message
    assert message.index("org/medium (500 B)") < message.index("org/small (300 B)")
    assert "route" in message
    assert pool.reservations() == {"org/small": 300, "org/medium": 500}


def test_reserve_larger_than_budget(pool: GPUMemoryPool) -> None:
    with pytest.raises(BudgetExceededError, match=r"whole budget.*quantized"):
        pool.reserve("huge", 1001)
    assert pool.reservations() == {}


def test_commit_may_exceed_budget(source: MemorySource, caplog: pytest.LogCaptureFixture) -> None:
    # A cache bigger than the pool's budget, so the low estimate below shows up in the pool alone.
    cache: ModelCache[str] = ModelCache(2000)
    pool = GPUMemoryPool("cpu", budget_bytes=1000, source=source, resident_bytes=lambda: cache.used_bytes)
    pool.reserve("big", 900)
    cache.put("big", "B", 1200)  # the estimate was low; the model is on the device anyway
    assert pool.commit("big", 1200) == 300
    assert pool.free_bytes == 0
    assert "over the" in caplog.text
    with pytest.raises(KeyError):
        pool.commit("never-reserved", 1)


def test_invalid_arguments(source: MemorySource) -> None:
    with pytest.raises(ConfigError):
        GPUMemoryPool("cpu", budget_bytes=0, source=source)
    pool = GPUMemoryPool("cpu", budget_bytes=10, source=source)
    with pytest.raises(ConfigError):
        pool.reserve("a", -1)
    pool.reserve("a", 1)
    with pytest.raises(ConfigError):
        pool.commit("a", -1)


def test_stats_keys_and_json(pool: GPUMemoryPool, source: MemorySource) -> None:
    pool.reserve("a", 100)
    stats = pool.stats()
    assert set(stats) == {
        "device",
        "budget_bytes",
        "resident_bytes",
        "reserved_bytes",
        "free_bytes",
        "reservations",
        "device_total_bytes",
        "device_free_bytes",
        "allocator",
        "reserved_to_allocated",
        "alloc_conf",
        "preallocated_mb",
    }
    assert stats["reservations"] == {"a": 100}
    assert (stats["budget_bytes"], stats["reserved_bytes"], stats["free_bytes"]) == (1000, 100, 900)
    assert stats["resident_bytes"] == 0
    assert stats["device_total_bytes"] == source.total_bytes()
    if isinstance(source, FakeSource):
        assert stats["reserved_to_allocated"] == pytest.approx(1.5)
        assert stats["allocator"]["inactive_split_bytes"] == 10 * MiB
    else:
        assert stats["reserved_to_allocated"] is None  # no caching allocator on the CPU
        assert stats["allocator"]["rss_bytes"] > 0
    assert json.loads(json.dumps(stats)) == stats


# ------------------------------------------------------------------------------------ configure_allocator


@pytest.fixture
def clean_alloc_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(ALLOC_CONF_ENV, raising=False)
    monkeypatch.delenv(device_memory.GENERIC_ALLOC_CONF_ENV, raising=False)
    yield


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in (ALLOC_CONF_ENV, device_memory.GENERIC_ALLOC_CONF_ENV)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def test_configure_allocator_before_torch_in_a_fresh_process() -> None:
    result = _run(
        """
        import os, sys
        from gpufleet.gpu.runtime.device_memory import configure_allocator
        assert "torch" not in sys.modules, "gpu.runtime.memory_pool must not import torch"
        print(configure_allocator())
        print(os.environ["PYTORCH_CUDA_ALLOC_CONF"])
        import torch  # the allocator would now read it when CUDA starts
        """
    )
    assert result.stdout.split() == [DEFAULT_ALLOC_CONF, DEFAULT_ALLOC_CONF]


def test_configure_allocator_respects_operator_setting() -> None:
    code = """
        import os
        from gpufleet.gpu.runtime.device_memory import configure_allocator
        print(configure_allocator("expandable_segments:True"))
        print(os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "-"))
        """
    assert _run(code, PYTORCH_CUDA_ALLOC_CONF="max_split_size_mb:128").stdout.split() == [
        "max_split_size_mb:128",
        "max_split_size_mb:128",
    ]
    # The generic name counts as the operator's choice too; setting the CUDA one would override it.
    assert _run(code, PYTORCH_ALLOC_CONF="backend:native").stdout.split() == ["backend:native", "-"]


def test_configure_allocator_custom_setting_after_torch_import_without_cuda() -> None:
    result = _run(
        """
        import torch
        from gpufleet.gpu.runtime.device_memory import configure_allocator
        print(configure_allocator("expandable_segments:True,max_split_size_mb:256"))
        """
    )
    assert result.stdout.strip() == "expandable_segments:True,max_split_size_mb:256"


def test_configure_allocator_after_cuda_started_changes_nothing(
    clean_alloc_env: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(device_memory, "cuda_initialized", lambda: True)
    assert configure_allocator() == ""
    assert ALLOC_CONF_ENV not in os.environ
    assert "already initialised" in caplog.text


def test_configure_allocator_in_process(clean_alloc_env: None) -> None:
    assert configure_allocator() == DEFAULT_ALLOC_CONF
    assert os.environ[ALLOC_CONF_ENV] == DEFAULT_ALLOC_CONF
