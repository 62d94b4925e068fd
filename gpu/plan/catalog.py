"""GPU types as data: memory, compute capability, bf16/FP8 support and hourly price.

Pure Python (no torch, no NVML): the router and the ``gpufleet plan`` command read it on machines without a GPU,
and the worker uses :func:`gpu_type_from_device_name` to name itself (``h100-0@host``) from what NVML reports.
Queue names are not planning data: they are made from a type's name by ``gpufleet.tasks.names``.

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

from gpufleet.gpu.errors import ConfigError
from gpufleet.gpu.units import GiB, MiB

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
    """

    name: str
    description: str
    memory_bytes: int
    compute_capability: tuple[int, int]
    supports_bf16: bool
    supports_fp8: bool
    price_per_hour_usd: float

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


@dataclass(frozen=True)
class _Board:
    """A board family NVML names: its compute capability and the catalog types it can be, largest first."""

    pattern: str
    compute_capability: tuple[int, int]
    types: tuple[str, ...]


# Matched in order, as whole words, on the upper-cased NVML name with dashes and underscores read as spaces
# ("NVIDIA A100-SXM4-40GB" -> "NVIDIA A100 SXM4 40GB"). Only boards that are (or are built like) a catalog type are
# listed; any other board gets a stand-in chosen from its own capabilities (see gpu_type_from_device_name). Whole
# words keep "A100" off an "RTX A1000" and "L4" off an "L40S".
_KNOWN_BOARDS: tuple[_Board, ...] = (
    _Board(r"\bG?B200\b|\bB100\b", (10, 0), ("b200",)),
    _Board(r"\bG?H200\b", (9, 0), ("h200", "h100")),  # a GH200 has 96 or 144 GB
    _Board(r"\bH100\b|\bH800\b", (9, 0), ("h100",)),
    _Board(r"\bA100\b|\bA800\b", (8, 0), ("a100-80gb", "a100-40gb")),
    _Board(r"\bL40S?\b|\bRTX 6000 ADA\b", (8, 9), ("l40s",)),
    _Board(r"\bA10G?\b", (8, 6), ("a10g",)),
    _Board(r"\bL4\b", (8, 9), ("l4",)),
    _Board(r"\bT4\b", (7, 5), ("t4",)),
)

# Boards report a little less memory than the type's usual board (PCIe A100 40GB: 40536 vs 40960 MiB).
_MEMORY_TOLERANCE = 1.02


def capabilities(compute_capability: tuple[int, int]) -> tuple[bool, bool, bool]:
    """What planning assumes of a device of this compute capability: ``(bf16, fp8, fp8 KV cache)``."""
    return compute_capability >= (8, 0), compute_capability >= (8, 9), compute_capability >= (9, 0)


def _covers(device_cc: tuple[int, int], gpu: GpuType) -> bool:
    """Whether a device of ``device_cc`` can do everything a job planned for ``gpu`` may ask of it.

    That is more than :func:`capabilities`: quantized checkpoints are accepted or refused by the compute
    capability of the queue's type (GPTQ, AWQ and MXFP4 kernels need 7.5, bitsandbytes 7.0, compressed-tensors
    8.0: ``gpu/runtime/quantization.py``), and so may anything added later. Every such requirement is a minimum
    compute capability, so a device covers a type exactly when its own is at least the type's: a V100 (7.0) is
    never a ``t4`` (7.5), whose queue gets GPTQ models.
    """
    return device_cc >= gpu.compute_capability


def stand_in_type(memory_bytes: int, compute_capability: tuple[int, int]) -> GpuType | None:
    """The catalog type a device can stand in for without being credited with anything it lacks.

    Among GPU types with no more memory than the device and no higher compute capability (so no capability it
    lacks: bf16, FP8, FP8 KV cache, quantization kernels), the largest is taken; types within a few GiB of each
    other (an 80 GB A100 and H100) count as one size, and then the one closest in capabilities wins. A stand-in is
    conservative: plans for it always fit and run on the device.

    Args:
        memory_bytes: the device's total memory.
        compute_capability: the device's CUDA compute capability ``(major, minor)``.

    Returns:
        The stand-in, or ``None`` when the device is smaller than every type it could stand in for, or older
        (a lower compute capability) than every type.
    """
    candidates = [
        gpu
        for gpu in all_types(include_cpu=False)
        if gpu.memory_bytes <= memory_bytes * _MEMORY_TOLERANCE and _covers(compute_capability, gpu)
    ]
    if not candidates:
        return None
    return max(
        candidates,
        key=lambda gpu: (round(gpu.memory_bytes / (8 * GiB)), gpu.compute_capability, -gpu.price_per_hour_usd),
    )


def gpu_type_from_device_name(
    nvml_name: str, memory_bytes: int, compute_capability: tuple[int, int] | None = None
) -> str:
    """The catalog type a device serves as, from what NVML reports about it.

    A known board maps to its own type (``"NVIDIA H100 80GB HBM3"``, ``"NVIDIA H100 NVL"`` → ``h100``,
    ``"Tesla T4"`` → ``t4``, ``"NVIDIA A100-PCIE-40GB"`` → ``a100-40gb``: A100s are told apart by memory). Any other
    board (an RTX A6000, a GeForce card) is never given a known type's capabilities: it serves as the
    :func:`stand_in_type` for its memory and compute capability (an RTX A6000, 48 GB and 8.6 without FP8, serves as
    ``a100-40gb``, not as the FP8-capable ``l40s``), so nothing planned for its queue needs more than it has.

    Args:
        nvml_name: ``nvmlDeviceGetName`` output.
        memory_bytes: ``nvmlDeviceGetMemoryInfo(...).total``.
        compute_capability: ``nvmlDeviceGetCudaComputeCapability`` output; needed for boards not listed here.

    Returns:
        A catalog name other than ``cpu``.

    Raises:
        ConfigError: ``memory_bytes`` is not positive; the board is unknown and ``compute_capability`` was not
            given; or no catalog type fits in the device's memory and compute capability (a V100, 7.0, is older
            than every type).
    """
    if memory_bytes <= 0:
        raise ConfigError(
            f"device {nvml_name!r} reports {memory_bytes} bytes of memory: pass the total from "
            "nvmlDeviceGetMemoryInfo(handle).total"
        )
    key = re.sub(r"[\s_-]+", " ", nvml_name.upper())
    board = next((board for board in _KNOWN_BOARDS if re.search(board.pattern, key)), None)
    if board is not None:
        for name in board.types:
            if CATALOG[name].memory_bytes <= memory_bytes * _MEMORY_TOLERANCE:
                return name
        compute_capability = compute_capability or board.compute_capability
    if compute_capability is None:
        raise ConfigError(
            f"unknown GPU {nvml_name!r}: its compute capability is needed to choose a catalog type it can serve "
            "as without claiming bf16/FP8 support it may lack; pass nvmlDeviceGetCudaComputeCapability(handle), "
            "or add the board to _KNOWN_BOARDS in gpu/plan/catalog.py"
        )
    stand_in = stand_in_type(memory_bytes, compute_capability)
    if stand_in is None:
        major, minor = compute_capability
        device = f"GPU {nvml_name!r} ({memory_bytes / GiB:.1f} GiB, compute capability {major}.{minor})"
        if not any(_covers(compute_capability, gpu) for gpu in all_types(include_cpu=False)):
            oldest = min(all_types(include_cpu=False), key=lambda gpu: gpu.compute_capability)
            o_major, o_minor = oldest.compute_capability
            raise ConfigError(
                f"{device} is older than every catalog GPU type (the oldest, {oldest.name}, has {o_major}.{o_minor}): "
                f"serving as {oldest.name}, it would be sent jobs planned for {o_major}.{o_minor}, such as quantized "
                "models whose kernels it lacks. Run a CPU worker (--cpu) instead, or add a type for it to "
                "gpu/plan/catalog.py"
            )
        raise ConfigError(
            f"{device} is smaller than every catalog GPU type it could serve as (the smallest is "
            f"{all_types(include_cpu=False)[0].name}); run a CPU worker (--cpu) instead, or add a type for it to "
            "gpu/plan/catalog.py"
        )
    return stand_in.name
