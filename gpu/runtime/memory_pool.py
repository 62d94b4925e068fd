"""Per-device memory budget, reservations of loads in flight, and the one report of device memory.

:class:`GPUMemoryPool` is bookkeeping, not an allocator: it holds a byte budget for the device (vLLM's
``gpu_memory_utilization`` fraction of the device, or an explicit byte override). Who counts which bytes:

* resident models are counted by the :class:`~gpu.runtime.model_cache.ModelCache` alone; the pool reads that
  total through its ``resident_bytes`` callable and records no size of its own for them;
* a load in flight holds a *reservation*: :meth:`GPUMemoryPool.reserve` its estimate before loading (so a load
  that cannot fit is refused before it touches the device), then either :meth:`GPUMemoryPool.commit` once the
  cache holds the loaded model (the reservation ends; the cache now counts the measured size) or
  :meth:`GPUMemoryPool.release` when the load failed.

:meth:`GPUMemoryPool.stats` is the one report of device and allocator memory (budget, resident, reserved,
driver figures, allocator counters); nothing else in :mod:`gpu.runtime` reports them.

Where the bytes come from is a :class:`MemorySource`: :class:`CudaMemorySource` asks torch's CUDA caching
allocator, :class:`CpuMemorySource` asks psutil, and tests may plug in a fake behind the same protocol.

Fragmentation is handled by the allocator configuration, not by the pool: :func:`configure_allocator` turns on
``expandable_segments`` before CUDA starts. Preallocating common block sizes (the original design's idea) is
kept as an option, off by default, until ``benchmarks/runtime_bench.py`` shows it helps on a GPU.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from gpu.config import GpuConfig
from gpu.errors import CapacityError, ConfigError
from gpu.units import MiB, fmt_bytes

__all__ = [
    "ALLOC_CONF_ENV",
    "DEFAULT_ALLOC_CONF",
    "CpuMemorySource",
    "CudaMemorySource",
    "GPUMemoryPool",
    "MemorySource",
    "configure_allocator",
    "source_for_device",
]

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


class GPUMemoryPool:
    """A device's byte budget, what resident models hold of it, and the reservations of loads in flight.

    Thread-safe. The resident total is read, never stored: ``resident_bytes`` is typically the model cache's
    ``used_bytes``, so a model's size is recorded once, by the cache.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        budget_bytes: how many bytes models may hold on the device together.
        source: where device figures come from; None picks :func:`source_for_device`.
        resident_bytes: returns the bytes resident models hold now; None counts none (a pool without a cache).

    Raises:
        ConfigError: ``budget_bytes`` is not positive or the device is not served.
    """

    def __init__(
        self,
        device: str,
        *,
        budget_bytes: int,
        source: MemorySource | None = None,
        resident_bytes: Callable[[], int] | None = None,
    ) -> None:
        if budget_bytes <= 0:
            raise ConfigError(f"memory budget for {device} must be a positive number of bytes, got {budget_bytes}")
        self.device = device
        self._budget_bytes = budget_bytes
        self._source = source if source is not None else source_for_device(device)
        self._resident_bytes = resident_bytes if resident_bytes is not None else _nothing_resident
        self._lock = threading.RLock()
        self._reservations: dict[str, int] = {}
        self._preallocated_mb: tuple[int, ...] = ()

    @classmethod
    def from_config(
        cls,
        device: str,
        config: GpuConfig,
        *,
        source: MemorySource | None = None,
        resident_bytes: Callable[[], int] | None = None,
    ) -> GPUMemoryPool:
        """A pool whose budget is ``memory_pool.budget_bytes`` when set, else ``memory_fraction`` of the device total.

        When ``memory_pool.enabled`` is off the budget is the whole device (reservations are still tracked, for
        reporting). When ``memory_pool.preallocate_common_sizes`` is on, :meth:`preallocate` runs here.

        Args:
            device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
            config: the worker's GPU settings.
            source: where device figures come from; None picks :func:`source_for_device`.
            resident_bytes: returns the bytes resident models hold now (the model cache's ``used_bytes``).

        Returns:
            The pool.

        Raises:
            ConfigError: the explicit budget is larger than the device.
        """
        source = source if source is not None else source_for_device(device)
        total = source.total_bytes()
        pool_config = config.memory_pool
        if not pool_config.enabled:
            budget = total
        elif pool_config.budget_bytes is not None:
            budget = pool_config.budget_bytes
            if budget > total:
                raise ConfigError(
                    f"memory_pool.budget_bytes is {fmt_bytes(budget)} but {device} has {fmt_bytes(total)} in all; "
                    "lower GPUFLEET_GPU__MEMORY_POOL__BUDGET_BYTES or unset it to use GPUFLEET_GPU__MEMORY_FRACTION"
                )
        else:
            budget = int(total * config.memory_fraction)
        pool = cls(device, budget_bytes=budget, source=source, resident_bytes=resident_bytes)
        if pool_config.enabled and pool_config.preallocate_common_sizes:
            pool.preallocate(pool_config.common_sizes_mb)
        return pool

    # -------------------------------------------------------------------------------------------- budget

    @property
    def budget_bytes(self) -> int:
        """The byte budget for models on this device."""
        return self._budget_bytes

    @property
    def resident_bytes(self) -> int:
        """Bytes held by resident models (read from the model cache)."""
        return self._resident_bytes()

    @property
    def reserved_bytes(self) -> int:
        """Bytes reserved by loads in flight."""
        with self._lock:
            return sum(self._reservations.values())

    @property
    def free_bytes(self) -> int:
        """Budget neither resident nor reserved; never negative."""
        resident = self._resident_bytes()
        with self._lock:
            return max(0, self._budget_bytes - resident - sum(self._reservations.values()))

    @property
    def source(self) -> MemorySource:
        """Where this pool reads device figures from."""
        return self._source

    def reservations(self) -> dict[str, int]:
        """Bytes reserved per model id by loads in flight (a copy)."""
        with self._lock:
            return dict(self._reservations)

    def reserve(self, model_id: str, estimate_bytes: int) -> None:
        """Reserve ``estimate_bytes`` for loading ``model_id``, against the budget left by resident models and
        other loads in flight.

        Reserving a model that already holds a reservation replaces it (its old bytes count as free). Make room
        in the model cache first (``ModelCache.make_room``): the pool only checks, it never evicts.

        Args:
            model_id: the model to load.
            estimate_bytes: its estimated bytes on the device.

        Raises:
            ConfigError: ``estimate_bytes`` is negative.
            CapacityError: the reservation does not fit the free budget; nothing is reserved.
        """
        if estimate_bytes < 0:
            raise ConfigError(f"estimate for {model_id!r} must be >= 0 bytes, got {estimate_bytes}")
        if estimate_bytes > self._budget_bytes:
            raise CapacityError(
                f"model {model_id!r} needs {fmt_bytes(estimate_bytes)}; the whole budget of {self.device} is "
                f"{fmt_bytes(self._budget_bytes)}; try a quantized variant or route it to a GPU with more memory"
            )
        # Read outside this pool's lock: the cache calls eviction hooks under its own lock, so taking the two
        # locks in both orders could deadlock two threads.
        resident = self._resident_bytes()
        with self._lock:
            others = {k: v for k, v in self._reservations.items() if k != model_id}
            free = self._budget_bytes - resident - sum(others.values())
            if estimate_bytes > free:
                raise CapacityError(self._refusal(model_id, estimate_bytes, free, resident, others))
            self._reservations[model_id] = estimate_bytes

    def _refusal(self, model_id: str, estimate_bytes: int, free: int, resident: int, others: dict[str, int]) -> str:
        held = f"{fmt_bytes(resident)} held by resident models"
        if others:
            holders = ", ".join(f"{k} ({fmt_bytes(v)})" for k, v in sorted(others.items(), key=lambda kv: -kv[1]))
            held += f", {fmt_bytes(sum(others.values()))} reserved by loads in flight: {holders}"
        return (
            f"model {model_id!r} needs {fmt_bytes(estimate_bytes)}; {self.device} has {fmt_bytes(max(0, free))} "
            f"free of its {fmt_bytes(self._budget_bytes)} budget ({held}); unload a model (the model cache evicts "
            f"unpinned ones first), or route {model_id!r} to another worker or a quantized variant"
        )

    def commit(self, model_id: str, measured_bytes: int) -> int:
        """End ``model_id``'s reservation once its load succeeded and the model cache holds it.

        From here on the cache counts the model (at ``measured_bytes``); the pool keeps no size for it. The model
        is already on the device, so this never refuses; if resident bytes and the other reservations then
        exceed the budget (the estimate was low), a warning is logged.

        Args:
            model_id: a reserved model, now put into the cache.
            measured_bytes: what it actually holds.

        Returns:
            measured minus estimated bytes (positive when the estimate was low).

        Raises:
            KeyError: ``model_id`` holds no reservation.
            ConfigError: ``measured_bytes`` is negative.
        """
        if measured_bytes < 0:
            raise ConfigError(f"measured size of {model_id!r} must be >= 0 bytes, got {measured_bytes}")
        with self._lock:
            if model_id not in self._reservations:
                raise KeyError(f"{model_id!r} holds no reservation on {self.device}; reserve it before loading")
            delta = measured_bytes - self._reservations.pop(model_id)
            reserved = sum(self._reservations.values())
        total = self._resident_bytes() + reserved
        if total > self._budget_bytes:
            logger.warning(
                "%s: %r measured %s (estimate off by %s); resident and reserved now %s, over the %s budget",
                self.device,
                model_id,
                fmt_bytes(measured_bytes),
                fmt_bytes(delta),
                fmt_bytes(total),
                fmt_bytes(self._budget_bytes),
            )
        return delta

    def release(self, model_id: str) -> int:
        """Drop ``model_id``'s reservation after a failed or abandoned load (idempotent).

        Args:
            model_id: the model whose load did not complete.

        Returns:
            The bytes released (0 when it held none).
        """
        with self._lock:
            return self._reservations.pop(model_id, 0)

    # ----------------------------------------------------------------------------------------- allocator

    def preallocate(self, sizes_mb: Sequence[int]) -> list[int]:
        """Allocate one block of each size together, then free them, so torch's caching allocator keeps the
        segments for later allocations of those sizes (the original design's "preallocate common sizes").

        Off by default: ``benchmarks/runtime_bench.py`` compares it with ``expandable_segments``. A no-op on
        the CPU, which has no caching allocator.

        Args:
            sizes_mb: block sizes in MiB.

        Returns:
            The sizes actually allocated (empty on the CPU).

        Raises:
            ConfigError: a size is not positive.
            DeviceOutOfMemoryError: the device cannot hold the blocks.
        """
        if any(size <= 0 for size in sizes_mb):
            raise ConfigError(f"preallocation sizes must be positive MiB, got {list(sizes_mb)}")
        if not self.device.startswith("cuda"):
            return []
        import torch

        from gpu.runtime.oom import translate_oom

        with translate_oom(f"preallocating {list(sizes_mb)} MiB on {self.device}"):
            blocks = [torch.empty(size * MiB, dtype=torch.uint8, device=self.device) for size in sizes_mb]
        # Freed, not emptied: the caching allocator keeps the segments reserved for reuse.
        del blocks
        self._preallocated_mb = tuple(sizes_mb)
        return list(sizes_mb)

    def stats(self) -> dict[str, Any]:
        """The one report of device memory, JSON-ready: budget, resident, reserved, device and allocator figures.

        Returns:
            ``device``, ``budget_bytes``, ``resident_bytes`` (held by models in the cache), ``reserved_bytes``
            (loads in flight), ``free_bytes`` (budget left), ``reservations`` (per loading model),
            ``device_total_bytes``, ``device_free_bytes`` (driver view), ``allocator`` (the source's counters:
            allocated/reserved bytes and their peaks on CUDA, ``rss_bytes`` on the CPU),
            ``reserved_to_allocated`` (allocator reserved ÷ allocated: how much cached memory holds no tensor;
            None where the source has no caching allocator or nothing is allocated), ``alloc_conf`` (the
            allocator configuration in the environment) and ``preallocated_mb``.
        """
        resident = self._resident_bytes()
        with self._lock:
            reservations = dict(self._reservations)
        allocator = self._source.allocator_stats()
        allocated = allocator.get("allocated_bytes")
        reserved = allocator.get("reserved_bytes")
        ratio = reserved / allocated if allocated and reserved is not None else None
        reserved_total = sum(reservations.values())
        return {
            "device": self.device,
            "budget_bytes": self._budget_bytes,
            "resident_bytes": resident,
            "reserved_bytes": reserved_total,
            "free_bytes": max(0, self._budget_bytes - resident - reserved_total),
            "reservations": reservations,
            "device_total_bytes": self._source.total_bytes(),
            "device_free_bytes": self._source.free_bytes(),
            "allocator": allocator,
            "reserved_to_allocated": ratio,
            "alloc_conf": os.environ.get(ALLOC_CONF_ENV) or os.environ.get(GENERIC_ALLOC_CONF_ENV) or "",
            "preallocated_mb": list(self._preallocated_mb),
        }

    configure_allocator = staticmethod(configure_allocator)


def _nothing_resident() -> int:
    return 0
