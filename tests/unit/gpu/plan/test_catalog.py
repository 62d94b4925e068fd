"""The GPU catalog: the data the issue asks for, and NVML names mapped to catalog types."""

from __future__ import annotations

import pytest

import gpu.plan.catalog
from gpu.errors import ConfigError
from gpu.plan.catalog import (
    CATALOG,
    CPU,
    GPU_TYPE_NAMES,
    all_types,
    closest_by_memory,
    get_gpu_type,
    gpu_type_from_device_name,
    queue_for,
)
from gpu.units import GiB, MiB

# (name, nominal memory in GB, compute capability, bf16, fp8, queue)
EXPECTED = [
    ("t4", 16, (7, 5), False, False, "gpu.t4"),
    ("l4", 24, (8, 9), True, True, "gpu.l4"),
    ("a10g", 24, (8, 6), True, False, "gpu.a10g"),
    ("l40s", 48, (8, 9), True, True, "gpu.l40s"),
    ("a100-40gb", 40, (8, 0), True, False, "gpu.a100-40gb"),
    ("a100-80gb", 80, (8, 0), True, False, "gpu.a100-80gb"),
    ("h100", 80, (9, 0), True, True, "gpu.h100"),
    ("h200", 141, (9, 0), True, True, "gpu.h200"),
    ("b200", 192, (10, 0), True, True, "gpu.b200"),
]


def test_catalog_holds_the_nine_gpu_types_and_cpu() -> None:
    assert set(CATALOG) == {name for name, *_ in EXPECTED} | {CPU}
    assert set(GPU_TYPE_NAMES) == {name for name, *_ in EXPECTED}
    assert all_types()[-1].name == CPU
    assert CPU not in {gpu.name for gpu in all_types(include_cpu=False)}


@pytest.mark.parametrize(("name", "nominal_gb", "cc", "bf16", "fp8", "queue"), EXPECTED)
def test_gpu_type_data(*, name: str, nominal_gb: int, cc: tuple[int, int], bf16: bool, fp8: bool, queue: str) -> None:
    gpu = get_gpu_type(name)
    # NVML totals differ from the marketing figure (GB vs GiB, reserved memory) by a few percent.
    assert gpu.memory_bytes == pytest.approx(nominal_gb * 1e9, rel=0.08)
    assert gpu.compute_capability == cc
    assert gpu.supports_bf16 is bf16
    assert gpu.supports_fp8 is fp8
    assert gpu.queue == queue == queue_for(name)
    assert 0.1 < gpu.price_per_hour_usd < 50
    assert gpu.supports_fp8_kv_cache is (cc >= (9, 0))
    assert not gpu.is_cpu


def test_cpu_entry() -> None:
    cpu = get_gpu_type("cpu")
    assert cpu.is_cpu
    assert cpu.queue == "cpu"
    assert not cpu.supports_bf16 and not cpu.supports_fp8 and not cpu.supports_fp8_kv_cache
    assert cpu.memory_bytes > 0 and cpu.price_per_hour_usd > 0


def test_prices_state_their_source_and_date() -> None:
    doc = gpu.plan.catalog.__doc__ or ""
    assert "2026-11" in doc
    assert "approximate" in doc
    assert "on-demand" in doc


def test_prices_rank_as_expected() -> None:
    price = {gpu.name: gpu.price_per_hour_usd for gpu in all_types(include_cpu=False)}
    assert price["t4"] < price["l4"] < price["a10g"] < price["l40s"] < price["a100-40gb"]
    assert price["a100-40gb"] < price["a100-80gb"] < price["h100"] < price["h200"] < price["b200"]


def test_get_gpu_type_is_case_insensitive_and_refuses_unknown_names() -> None:
    assert get_gpu_type(" H100 ").name == "h100"
    with pytest.raises(ConfigError, match=r"unknown GPU type 'v100'.*h100"):
        get_gpu_type("v100")
    with pytest.raises(ConfigError):
        queue_for("tpu")


@pytest.mark.parametrize(
    ("nvml_name", "memory_mib", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", 81559, "h100"),
        ("NVIDIA H100 PCIe", 81559, "h100"),
        ("NVIDIA H100 NVL", 95830, "h100"),
        ("Tesla T4", 15360, "t4"),
        ("NVIDIA A100-SXM4-40GB", 40960, "a100-40gb"),
        ("NVIDIA A100-PCIE-40GB", 40536, "a100-40gb"),
        ("NVIDIA A100-SXM4-80GB", 81920, "a100-80gb"),
        ("NVIDIA A100 80GB PCIe", 81920, "a100-80gb"),
        ("NVIDIA L40S", 46068, "l40s"),
        ("NVIDIA L40", 46068, "l40s"),
        ("NVIDIA L4", 23034, "l4"),
        ("NVIDIA A10G", 23028, "a10g"),
        ("NVIDIA A10", 23028, "a10g"),
        ("NVIDIA H200", 143771, "h200"),
        ("NVIDIA GH200 480GB", 97871, "h200"),
        ("NVIDIA B200", 183359, "b200"),
        # Unknown cards: the largest type that does not assume more memory than the card has.
        ("NVIDIA GeForce RTX 4090", 24564, "l4"),
        ("NVIDIA RTX A6000", 49140, "l40s"),
        ("Tesla V100-SXM2-32GB", 32768, "l4"),
        ("NVIDIA GeForce RTX 3060", 12288, "t4"),
        ("Some Future GPU 400GB", 400 * 1024, "b200"),
    ],
)
def test_gpu_type_from_device_name(nvml_name: str, memory_mib: int, expected: str) -> None:
    assert gpu_type_from_device_name(nvml_name, memory_mib * MiB) == expected


def test_device_name_with_no_memory_is_refused() -> None:
    with pytest.raises(ConfigError, match="memory"):
        gpu_type_from_device_name("NVIDIA H100 80GB HBM3", 0)


def test_closest_by_memory_never_assumes_more_than_the_device_has() -> None:
    for memory_gib in (8, 16, 20, 24, 32, 40, 45, 48, 64, 80, 96, 141, 192, 256):
        chosen = get_gpu_type(closest_by_memory(memory_gib * GiB))
        if chosen.name != "t4":  # the fallback for devices smaller than every type
            assert chosen.memory_bytes <= memory_gib * GiB * 1.02
