"""GPU types as data: memory, compute capability, bf16/FP8 support, hourly price and queue name.

Pure Python (no torch, no NVML): the router and the ``gpufleet plan`` command read it on machines without a GPU,
and the worker uses :func:`gpu_type_from_device_name` to name itself (``h100-0@host``) from what NVML reports.

Memory is what NVML reports as total device memory for the usual board of each type (slightly below the
marketing figure: a "16 GB" T4 reports 15360 MiB). Planning against the reported figure keeps placements honest.

Prices are approximate on-demand list prices per GPU-hour in USD from the large public clouds (AWS, Google
Cloud, Azure; for multi-GPU-only instances, the instance price divided by its GPU count), as of 2026-11. They
drift and differ by region and contract: they only rank types against each other, so replace them with your own
prices if the ranking differs for you.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from gpu.errors import ConfigError
from gpu.units import GiB, MiB

CPU: Final = "cpu"


@dataclass(frozen=True)
class GpuType:
    """One kind of accelerator (or the CPU) the fleet can run models on.

    Attributes:
        name: catalog name, e.g. ``"h100"``; also the prefix of worker names (``h100-0@host``).
        description: human name of the usual board, e.g. ``"NVIDIA H100 80GB HBM3"``.
        memory_bytes: total device memory as NVML reports it (for ``cpu``: a nominal host budget).
        compute_capability: CUDA compute capability ``(major, minor)``; ``(0, 0)`` for ``cpu``.
        supports_bf16: bfloat16 math in hardware (Ampere, compute capability 8.0, and later).
        supports_fp8: FP8 tensor cores (Ada 8.9 and Hopper 9.0 and later), needed to run FP8 weights.
        price_per_hour_usd: approximate on-demand price for one of these per hour (see the module docstring).
        queue: the Celery queue the workers of this type consume.
    """

    name: str
    description: str
    memory_bytes: int
    compute_capability: tuple[int, int]
    supports_bf16: bool
    supports_fp8: bool
    price_per_hour_usd: float
    queue: str

    @property
    def is_cpu(self) -> bool:
        """True for the ``cpu`` pseudo-type."""
        return self.name == CPU

    @property
    def supports_fp8_kv_cache(self) -> bool:
        """Whether planning assumes an FP8 KV cache here.

        Only Hopper (9.0) and later: Ada has FP8 tensor cores too, but FP8 KV cache kernels there are slower and
        less tested in serving engines, so we keep the KV cache in 16-bit on Ada and plan for that.
        """
        return self.compute_capability >= (9, 0)


def _gpu(
    name: str,
    description: str,
    memory_mib: int,
    cc: tuple[int, int],
    price_per_hour_usd: float,
) -> GpuType:
    return GpuType(
        name=name,
        description=description,
        memory_bytes=memory_mib * MiB,
        compute_capability=cc,
        supports_bf16=cc >= (8, 0),
        supports_fp8=cc >= (8, 9),
        price_per_hour_usd=price_per_hour_usd,
        queue=f"gpu.{name}",
    )


# Ordered by memory, then price. Memory in MiB as NVML reports it for the usual board.
_TYPES: tuple[GpuType, ...] = (
    _gpu("t4", "NVIDIA Tesla T4 16GB", 15360, (7, 5), 0.53),
    _gpu("l4", "NVIDIA L4 24GB", 23034, (8, 9), 0.80),
    _gpu("a10g", "NVIDIA A10G 24GB", 23028, (8, 6), 1.01),
    _gpu("a100-40gb", "NVIDIA A100-SXM4-40GB", 40960, (8, 0), 3.67),
    _gpu("l40s", "NVIDIA L40S 48GB", 46068, (8, 9), 1.86),
    _gpu("a100-80gb", "NVIDIA A100-SXM4-80GB", 81920, (8, 0), 5.07),
    _gpu("h100", "NVIDIA H100 80GB HBM3", 81559, (9, 0), 6.88),
    _gpu("h200", "NVIDIA H200 141GB HBM3e", 143771, (9, 0), 7.91),
    _gpu("b200", "NVIDIA B200 192GB HBM3e", 183359, (10, 0), 14.24),
    # The CPU: a nominal 64 GiB host budget (a typical general-purpose instance with 16 vCPUs), priced like one.
    # Never chosen unless the caller allows it (see gpu.plan.selection), so the price only orders fallbacks.
    GpuType(
        name=CPU,
        description="CPU (host memory)",
        memory_bytes=64 * GiB,
        compute_capability=(0, 0),
        supports_bf16=False,
        supports_fp8=False,
        price_per_hour_usd=0.68,
        queue=CPU,
    ),
)

CATALOG: Final = MappingProxyType({gpu.name: gpu for gpu in _TYPES})
"""Every known type by name, including ``cpu``. Read-only."""

GPU_TYPE_NAMES: Final = tuple(gpu.name for gpu in _TYPES if not gpu.is_cpu)
"""The GPU type names (no ``cpu``) in catalog order: by memory class, smallest first."""


def get_gpu_type(name: str) -> GpuType:
    """The catalog entry for ``name`` (case-insensitive).

    Raises:
        ConfigError: ``name`` is not in the catalog.
    """
    key = name.strip().lower() if isinstance(name, str) else ""
    try:
        return CATALOG[key]
    except KeyError:
        raise ConfigError(
            f"unknown GPU type {name!r}: use one of {', '.join(CATALOG)} (see gpu/plan/catalog.py)"
        ) from None


def all_types(*, include_cpu: bool = True) -> tuple[GpuType, ...]:
    """Every catalog entry in catalog order (by memory class, smallest first); ``cpu`` last when included."""
    return tuple(gpu for gpu in _TYPES if include_cpu or not gpu.is_cpu)


def queue_for(gpu_type: str) -> str:
    """The Celery queue that workers of ``gpu_type`` consume (``gpu.h100``, ``cpu``).

    Raises:
        ConfigError: ``gpu_type`` is not in the catalog.
    """
    return get_gpu_type(gpu_type).queue


# NVML names seen in the wild, matched in order on the upper-cased name with spaces and dashes removed. The
# order matters: "H100" before "H10", "A100" with its memory, "L40S" before "L40".
_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"B200|GB200|B100", "b200"),
    (r"H200|GH200", "h200"),
    (r"H100|H800", "h100"),
    (r"A100|A800", "a100"),  # memory decides 40 or 80 GB
    (r"L40S|L40|RTX6000ADA", "l40s"),
    (r"A10G|A10(?!0)", "a10g"),
    (r"L4(?!0)", "l4"),
    (r"T4(?!\d)", "t4"),
)


def gpu_type_from_device_name(nvml_name: str, memory_bytes: int) -> str:
    """Map a device name as NVML reports it to a catalog type name.

    Known names map by model (``"NVIDIA H100 80GB HBM3"`` → ``h100``, ``"Tesla T4"`` → ``t4``,
    ``"NVIDIA A100-SXM4-40GB"`` → ``a100-40gb``); A100s are told apart by their memory. Anything else (a
    GeForce card, a new model) maps to the closest type by memory (:func:`closest_by_memory`), which never
    assumes more memory than the device has.

    Args:
        nvml_name: ``nvmlDeviceGetName`` output.
        memory_bytes: ``nvmlDeviceGetMemoryInfo(...).total``.

    Returns:
        A catalog name other than ``cpu``.

    Raises:
        ConfigError: ``memory_bytes`` is not positive.
    """
    if memory_bytes <= 0:
        raise ConfigError(
            f"device {nvml_name!r} reports {memory_bytes} bytes of memory: pass the total from "
            "nvmlDeviceGetMemoryInfo(handle).total"
        )
    key = re.sub(r"[\s_-]+", "", nvml_name.upper())
    for pattern, gpu_name in _NAME_PATTERNS:
        if re.search(pattern, key):
            if gpu_name == "a100":
                return "a100-80gb" if memory_bytes > 48 * GiB else "a100-40gb"
            return gpu_name
    return closest_by_memory(memory_bytes)


def closest_by_memory(memory_bytes: int) -> str:
    """The GPU type (never ``cpu``) whose memory is closest to ``memory_bytes``.

    Among types with memory at most ``memory_bytes`` plus 2 % (a board reports a little less than its
    nominal size), the largest is taken, so an unknown 24 GB card maps to a 24 GB type, not a 40 GB one. A device
    smaller than every type maps to the smallest (``t4``).
    """
    candidates = [gpu for gpu in all_types(include_cpu=False) if gpu.memory_bytes <= memory_bytes * 1.02]
    if not candidates:
        return all_types(include_cpu=False)[0].name
    # Largest memory that does not exceed the device; among equals (L4 and A10G), the cheaper.
    best = max(candidates, key=lambda gpu: (gpu.memory_bytes // GiB, -gpu.price_per_hour_usd))
    return best.name
