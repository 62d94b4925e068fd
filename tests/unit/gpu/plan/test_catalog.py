"""The GPU catalog: the data the issue asks for, and NVML names mapped to catalog types."""

from __future__ import annotations

import pytest

import gpufleet.gpu.plan.catalog
from gpufleet.gpu.errors import ConfigError
from gpufleet.gpu.plan.catalog import (
    CATALOG,
    CPU,
    GPU_TYPE_NAMES,
    GpuType,
    all_types,
    capabilities,
    get_gpu_type,
    gpu_type_from_device_name,
    stand_in_type,
)
from gpufleet.gpu.units import GiB, MiB

# (name, nominal memory in GB, compute capability, bf16, fp8)
EXPECTED = [
    ("t4", 16, (7, 5), False, False),
    ("l4", 24, (8, 9), True, True),
    ("a10g", 24, (8, 6), True, False),
    ("l40s", 48, (8, 9), True, True),
    ("a100-40gb", 40, (8, 0), True, False),
    ("a100-80gb", 80, (8, 0), True, False),
    ("h100", 80, (9, 0), True, True),
    ("h200", 141, (9, 0), True, True),
    ("b200", 192, (10, 0), True, True),
]


def test_catalog_holds_the_nine_gpu_types_and_cpu() -> None:
    assert set(CATALOG) == {name for name, *_ in EXPECTED} | {CPU}
    assert set(GPU_TYPE_NAMES) == {name for name, *_ in EXPECTED}
    assert all_types()[-1].name == CPU
    assert CPU not in {gpu.name for gpu in all_types(include_cpu=False)}


@pytest.mark.parametrize(("name", "nominal_gb", "cc", "bf16", "fp8"), EXPECTED)
def test_gpu_type_data(*, name: str, nominal_gb: int, cc: tuple[int, int], bf16: bool, fp8: bool) -> None:
    gpu = get_gpu_type(name)
    # NVML totals differ from the marketing figure (GB vs GiB, reserved memory) by a few percent.
    assert gpu.memory_bytes == pytest.approx(nominal_gb * 1e9, rel=0.08)
    assert gpu.compute_capability == cc
    assert gpu.supports_bf16 is bf16
    assert gpu.supports_fp8 is fp8
    assert 0.1 < gpu.price_per_hour_usd < 50
    assert gpu.supports_fp8_kv_cache is (cc >= (9, 0))
    assert not gpu.is_cpu


def test_cpu_entry() -> None:
    cpu = get_gpu_type("cpu")
    assert cpu.is_cpu
    assert not cpu.supports_bf16 and not cpu.supports_fp8 and not cpu.supports_fp8_kv_cache
    assert cpu.memory_bytes > 0 and cpu.price_per_hour_usd > 0


def test_prices_state_their_source_and_date() -> None:
    doc = gpufleet.gpu.plan.catalog.__doc__ or ""
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


def test_the_catalog_knows_no_queues() -> None:
    # Queue names are the task contract's (tasks.names), not planning data.
    assert not any("queue" in field for field in GpuType.__dataclass_fields__)
    assert not hasattr(gpufleet.gpu.plan.catalog, "queue_for")


KNOWN_BOARDS = [
    ("NVIDIA H100 80GB HBM3", 81559, "h100"),  # SXM
    ("NVIDIA H100 PCIe", 81559, "h100"),
    ("NVIDIA H100 NVL", 95830, "h100"),
    ("Tesla T4", 15360, "t4"),
    ("NVIDIA A100-SXM4-40GB", 40960, "a100-40gb"),
    ("NVIDIA A100-PCIE-40GB", 40536, "a100-40gb"),
    ("NVIDIA A100-SXM4-80GB", 81920, "a100-80gb"),
    ("NVIDIA A100 80GB PCIe", 81920, "a100-80gb"),
    ("NVIDIA L40S", 46068, "l40s"),
    ("NVIDIA L40", 46068, "l40s"),
    ("NVIDIA RTX 6000 Ada Generation", 49140, "l40s"),
    ("NVIDIA L4", 23034, "l4"),
    ("NVIDIA A10G", 23028, "a10g"),
    ("NVIDIA A10", 23028, "a10g"),
    ("NVIDIA H200", 143771, "h200"),
    ("NVIDIA GH200 144G HBM3e", 146831, "h200"),
    ("NVIDIA GH200 480GB", 97871, "h100"),  # the 96 GB GH200 is not given an H200's 141 GB
    ("NVIDIA B200", 183359, "b200"),
]


@pytest.mark.parametrize(("nvml_name", "memory_mib", "expected"), KNOWN_BOARDS)
def test_known_boards_map_by_name(nvml_name: str, memory_mib: int, expected: str) -> None:
    assert gpu_type_from_device_name(nvml_name, memory_mib * MiB) == expected
    # What NVML says of the compute capability does not change a known board's type.
    assert gpu_type_from_device_name(nvml_name, memory_mib * MiB, get_gpu_type(expected).compute_capability) == (
        expected
    )


# Boards that are not a catalog type: (NVML name, MiB, compute capability, stand-in type).
UNKNOWN_BOARDS = [
    # 48 GB, Ampere 8.6: bf16 but no FP8, so not the (FP8) l40s the old memory-only match gave it.
    ("NVIDIA RTX A6000", 49140, (8, 6), "a100-40gb"),
    ("NVIDIA GeForce RTX 4090", 24564, (8, 9), "l4"),  # Ada: FP8 like an L4, no FP8 KV cache (Hopper)
    ("NVIDIA GeForce RTX 3090", 24576, (8, 6), "a10g"),  # 24 GB without FP8: not the l4
    ("Quadro RTX 6000", 24576, (7, 5), "t4"),  # 24 GB Turing: no bf16, so not the a10g or the l4
    ("Some Future GPU 400GB", 400 * 1024, (10, 0), "b200"),
]


@pytest.mark.parametrize(("nvml_name", "memory_mib", "cc", "expected"), UNKNOWN_BOARDS)
def test_unknown_boards_stand_in_for_a_type_they_can_fully_serve(
    nvml_name: str, memory_mib: int, cc: tuple[int, int], expected: str
) -> None:
    assert gpu_type_from_device_name(nvml_name, memory_mib * MiB, cc) == expected
    chosen = get_gpu_type(expected)
    bf16, fp8 = cc >= (8, 0), cc >= (8, 9)
    assert chosen.memory_bytes <= memory_mib * MiB * 1.02
    assert chosen.compute_capability <= cc, "every kernel the type's queue may need (GPTQ/AWQ: 7.5) is there"
    assert (chosen.supports_bf16 <= bf16) and (chosen.supports_fp8 <= fp8)
    assert chosen.supports_fp8_kv_cache <= (cc >= (9, 0))


def test_an_rtx_a6000_is_never_credited_with_fp8() -> None:
    a6000 = get_gpu_type(gpu_type_from_device_name("NVIDIA RTX A6000", 49140 * MiB, (8, 6)))
    assert not a6000.supports_fp8


def test_a_v100_is_never_typed_as_a_t4() -> None:
    # 7.0: no GPTQ/AWQ/MXFP4 kernels (7.5), which jobs planned for the t4's queue may need. No catalog type is as
    # old, so the worker is refused with what to do instead of being credited with kernels it lacks.
    with pytest.raises(ConfigError, match=r"V100.*7\.0\).*older than every catalog GPU type.*t4, has 7\.5.*--cpu"):
        gpu_type_from_device_name("Tesla V100-SXM2-32GB", 32768 * MiB, (7, 0))
    assert stand_in_type(32 * GiB, (7, 0)) is None


def test_an_unknown_board_without_its_compute_capability_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"unknown GPU 'NVIDIA RTX A6000'.*nvmlDeviceGetCudaComputeCapability"):
        gpu_type_from_device_name("NVIDIA RTX A6000", 49140 * MiB)


def test_a_board_smaller_than_every_type_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"RTX 3060.*smaller than every catalog GPU type.*--cpu"):
        gpu_type_from_device_name("NVIDIA GeForce RTX 3060", 12288 * MiB, (8, 6))


def test_names_match_whole_words_only() -> None:
    # "A100" inside "A1000", "L4" inside "L40S", "T4" inside a GeForce name: none is that board.
    with pytest.raises(ConfigError, match="unknown GPU"):
        gpu_type_from_device_name("NVIDIA RTX A1000", 16384 * MiB)
    assert gpu_type_from_device_name("NVIDIA RTX A1000", 16384 * MiB, (8, 6)) == "t4"


def test_device_name_with_no_memory_is_refused() -> None:
    with pytest.raises(ConfigError, match="memory"):
        gpu_type_from_device_name("NVIDIA H100 80GB HBM3", 0)


def test_stand_in_never_assumes_more_than_the_device_has() -> None:
    for cc in ((7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0)):
        for memory_gib in (8, 16, 20, 24, 32, 40, 45, 48, 64, 80, 96, 141, 192, 256):
            chosen = stand_in_type(memory_gib * GiB, cc)
            if chosen is None:
                assert memory_gib < 16 or cc < (7, 5)
                continue
            assert chosen.memory_bytes <= memory_gib * GiB * 1.02
            assert chosen.compute_capability <= cc, (cc, chosen.name)
            has, claims = capabilities(cc), capabilities(chosen.compute_capability)
            assert all(have or not claim for have, claim in zip(has, claims, strict=True)), (cc, chosen.name)
