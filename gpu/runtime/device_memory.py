"""Where device memory figures come from, and the allocator's configuration (torch imported lazily).

A :class:`MemorySource` answers total, free and allocator figures for one device: :class:`CudaMemorySource` asks
torch's CUDA caching allocator, :class:`CpuMemorySource` asks psutil, :class:`MultiDeviceMemorySource` sums
several GPUs, and tests may plug in a fake behind the same protocol. :func:`configure_allocator` sets
``expandable_segments`` before CUDA starts, which is how fragmentation is handled (not by the memory pool).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from gpufleet.gpu.errors import ConfigError

logger = logging.getLogger(__name__)

ALLOC_CONF_ENV = "PYTORCH_CUDA_ALLOC_CONF"
# torch >= 2.9 also reads the device-generic name; the CUDA allocator prefers ALLOC_CONF_ENV when both are set.
GENERIC_ALLOC_CONF_ENV = "PYTORCH_ALLOC_CONF"
DEFAULT_ALLOC_CONF = "expandable_segments:True"


@runtime_checkable
class MemorySource(Protocol):
    """Where a pool reads device memory figures from."""

    def total_bytes(self) -> int:
        """Total memory of the device."""
        ...

    def free_bytes(self) -> int:
        """Memory of the device not in use by anyone (this process's allocator cache counts as used)."""
        ...

    def allocator_stats(self) -> dict[str, int]:
        """This process's allocator counters (keys depend on the source; see the implementations)."""
        ...


class CudaMemorySource:
    """Figures from the CUDA driver and torch's caching allocator for one device.

    The first call initialises CUDA in this process (see :func:`configure_allocator` for why that matters).

    Args:
        device: ``"cuda"`` or ``"cuda:N"``.
    """

    def __init__(self, device: str = "cuda") -> None:
        self.device = device

    def total_bytes(self) -> int:
        import torch

        return int(torch.cuda.mem_get_info(self.device)[1])

    def free_bytes(self) -> int:
        import torch

        return int(torch.cuda.mem_get_info(self.device)[0])

    def allocator_stats(self) -> dict[str, int]:
        """``allocated_bytes``, ``reserved_bytes``, ``inactive_split_bytes`` (current), their peaks,
        ``num_alloc_retries`` (cudaMalloc retried after freeing the cache: a fragmentation symptom) and
        ``num_ooms``."""
        import torch

        stats = torch.cuda.memory_stats(self.device)
        return {
            "allocated_bytes": int(stats.get("allocated_bytes.all.current", 0)),
            "reserved_bytes": int(stats.get("reserved_bytes.all.current", 0)),
            "inactive_split_bytes": int(stats.get("inactive_split_bytes.all.current", 0)),
            "allocated_bytes_peak": int(stats.get("allocated_bytes.all.peak", 0)),
            "reserved_bytes_peak": int(stats.get("reserved_bytes.all.peak", 0)),
            "num_alloc_retries": int(stats.get("num_alloc_retries", 0)),
            "num_ooms": int(stats.get("num_ooms", 0)),
        }


class CpuMemorySource:
    """Figures for host memory (a ``--cpu`` worker): psutil's total and available, and this process's RSS.

    There is no caching allocator to inspect on the CPU, so :meth:`allocator_stats` reports ``rss_bytes`` only.
    """

    def total_bytes(self) -> int:
        import psutil

        return int(psutil.virtual_memory().total)

    def free_bytes(self) -> int:
        import psutil

        return int(psutil.virtual_memory().available)

    def allocator_stats(self) -> dict[str, int]:
        import psutil

        return {"rss_bytes": int(psutil.Process().memory_info().rss)}


class MultiDeviceMemorySource:
    """Figures summed over several devices: the memory of a worker that owns several GPUs.

    Args:
        sources: one source per device.

    Raises:
        ConfigError: no source was given.
    """

    def __init__(self, sources: Sequence[MemorySource]) -> None:
        if not sources:
            raise ConfigError("a multi-device memory source needs at least one device source")
        self.sources = tuple(sources)

    def total_bytes(self) -> int:
        return sum(source.total_bytes() for source in self.sources)

    def free_bytes(self) -> int:
        return sum(source.free_bytes() for source in self.sources)

    def allocator_stats(self) -> dict[str, int]:
        """Each counter summed over the devices (peaks are the sum of per-device peaks: an upper bound)."""
        summed: dict[str, int] = {}
        for source in self.sources:
            for key, value in source.allocator_stats().items():
                summed[key] = summed.get(key, 0) + value
        return summed


def source_for_device(device: str) -> MemorySource:
    """The memory source for ``device``.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns:
        A source; constructing it does not touch the device.

    Raises:
        ConfigError: the device is neither CPU nor CUDA.
    """
    if device == "cpu":
        return CpuMemorySource()
    if device == "cuda" or device.startswith("cuda:"):
        return CudaMemorySource(device)
    raise ConfigError(f"device {device!r} is not served; use 'cpu', 'cuda' or 'cuda:N'")


def cuda_initialized() -> bool:
    """Whether this process has initialised CUDA, without initialising it (False when torch is not imported)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    return bool(torch.cuda.is_initialized())


def configure_allocator(setting: str | None = None) -> str:
    """Configure torch's CUDA caching allocator through ``PYTORCH_CUDA_ALLOC_CONF``, before CUDA starts.

    The allocator parses its configuration once, when it is first used; later changes to the environment are
    ignored. So this must run before anything touches CUDA in this process (even ``torch.cuda.is_available()``
    can start it), ideally before ``import torch``. Setting it in the worker's parent also hands it to the pool
    children it forks. An operator's own ``PYTORCH_CUDA_ALLOC_CONF`` or ``PYTORCH_ALLOC_CONF`` always wins.

    ``expandable_segments:True`` is the default because it lets the allocator grow one mapped segment instead
    of caching fixed-size blocks: after models of different sizes are loaded and evicted, freed memory can be
    reused for a model of another size instead of stranding it in blocks that are split but unusable
    (reserved ≫ allocated).

    Args:
        setting: the allocator configuration string; None means ``"expandable_segments:True"``.

    Returns:
        The setting in effect for this process ("" when the allocator runs with its defaults).
    """
    wanted = DEFAULT_ALLOC_CONF if setting is None else setting
    existing = os.environ.get(ALLOC_CONF_ENV) or os.environ.get(GENERIC_ALLOC_CONF_ENV)
    if existing is not None:
        if existing != wanted:
            logger.info("allocator configuration %r left as the environment set it (not %r)", existing, wanted)
        return existing
    if cuda_initialized():
        logger.warning(
            "CUDA is already initialised in this process, so setting %s=%r now would have no effect; the "
            "allocator keeps its defaults. Call configure_allocator() before anything touches CUDA.",
            ALLOC_CONF_ENV,
            wanted,
        )
        return ""
    os.environ[ALLOC_CONF_ENV] = wanted
    return wanted
