"""Per-device memory budget, reservations of loads in flight, and the one report of device memory.

:class:`GPUMemoryPool` is bookkeeping, not an allocator: it holds a byte budget for the device (vLLM's
``gpu_memory_utilization`` fraction of the device, or an explicit byte override). Who counts which bytes:

* resident models are counted by the :class:`~gpufleet.gpu.runtime.model_cache.ModelCache` alone; the pool reads that
  total through its ``resident_bytes`` callable and records no size of its own for them;
* a load in flight holds a *reservation*: :meth:`GPUMemoryPool.reserve` its estimate before loading (so a load
  that cannot fit is refused before it touches the device), then either :meth:`GPUMemoryPool.commit` once the
  cache holds the loaded model (the reservation ends; the cache now counts the measured size) or
  :meth:`GPUMemoryPool.release` when the load failed.

:meth:`GPUMemoryPool.stats` is the one report of device and allocator memory (budget, resident, reserved,
driver figures, allocator counters); nothing else in :mod:`gpufleet.gpu.runtime` reports them.

Where the bytes come from is a :class:`~gpufleet.gpu.runtime.device_memory.MemorySource` (torch's CUDA caching
allocator, psutil on the CPU, or a fake in tests).

Fragmentation is handled by the allocator configuration, not by the pool:
:func:`~gpufleet.gpu.runtime.device_memory.configure_allocator` turns on ``expandable_segments`` before CUDA starts.
Preallocating common block sizes (``GPUFLEET_GPU__MEMORY_POOL__PREALLOCATE_COMMON_SIZES``) is an option, off by
default: ``benchmarks/runtime_bench.py`` measures whether it helps on a GPU.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from gpufleet.gpu.config import GpuConfig
from gpufleet.gpu.errors import BudgetExceededError, ConfigError
from gpufleet.gpu.runtime.device_memory import (
    ALLOC_CONF_ENV,
    GENERIC_ALLOC_CONF_ENV,
    MemorySource,
    MultiDeviceMemorySource,
    source_for_device,
)
from gpufleet.gpu.units import MiB, fmt_bytes

__all__ = ["GPUMemoryPool", "device_budget_bytes"]

logger = logging.getLogger(__name__)


def device_budget_bytes(device: str, total_bytes: int, config: GpuConfig) -> int:
    """One device's byte budget: ``memory_pool.budget_bytes`` when set, else ``memory_fraction`` of its total.

    The whole device when ``memory_pool.enabled`` is off. A worker owning several GPUs gets this on each.

    Args:
        device: the device, for the message.
        total_bytes: its total memory.
        config: the worker's GPU settings.

    Returns:
        The budget in bytes.

    Raises:
        ConfigError: the explicit budget is larger than the device.
    """
    pool_config = config.memory_pool
    if not pool_config.enabled:
        return total_bytes
    if pool_config.budget_bytes is not None:
        if pool_config.budget_bytes > total_bytes:
            raise ConfigError(
                f"memory_pool.budget_bytes is {fmt_bytes(pool_config.budget_bytes)} but {device} has "
                f"{fmt_bytes(total_bytes)} in all; lower GPUFLEET_GPU__MEMORY_POOL__BUDGET_BYTES (a budget per GPU) "
                "or unset it to use GPUFLEET_GPU__MEMORY_FRACTION"
            )
        return pool_config.budget_bytes
    return int(total_bytes * config.memory_fraction)


class GPUMemoryPool:
    """A device's byte budget, what resident models hold of it, and the reservations of loads in flight.

    Thread-safe. The resident total is read, never stored: ``resident_bytes`` is typically the model cache's
    ``used_bytes``, so a model's size is recorded once, by the cache.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        budget_bytes: how many bytes models may hold on the device together.
        source: where device figures come from; None picks :func:`source_for_device`.
        resident_bytes: returns the bytes resident models hold now; None counts none (a pool without a cache).
        device_budgets_bytes: for a pool spanning several GPUs (``device`` is the first), each GPU's budget;
            they sum to ``budget_bytes``. None: one device with the whole budget.

    Raises:
        ConfigError: ``budget_bytes`` is not positive, the per-GPU budgets do not sum to it, or the device is not
            served.
    """

    def __init__(
        self,
        device: str,
        *,
        budget_bytes: int,
        source: MemorySource | None = None,
        resident_bytes: Callable[[], int] | None = None,
        device_budgets_bytes: Sequence[int] | None = None,
    ) -> None:
        if budget_bytes <= 0:
            raise ConfigError(f"memory budget for {device} must be a positive number of bytes, got {budget_bytes}")
        budgets = tuple(device_budgets_bytes) if device_budgets_bytes is not None else (budget_bytes,)
        if sum(budgets) != budget_bytes or any(b < 0 for b in budgets):
            raise ConfigError(f"per-GPU budgets {list(budgets)} must be >= 0 and sum to the budget {budget_bytes}")
        self.device = device
        # What messages call the pool's memory: the device, or "cuda:0-1" for a pool over two GPUs.
        self.label = device if len(budgets) == 1 else f"{device}-{len(budgets) - 1}"
        self.device_budgets_bytes = budgets
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
        devices: Sequence[str] | None = None,
    ) -> GPUMemoryPool:
        """A pool whose budget is ``memory_pool.budget_bytes`` when set, else ``memory_fraction`` of the device total.

        When ``memory_pool.enabled`` is off the budget is the whole device (reservations are still tracked, for
        reporting). When ``memory_pool.preallocate_common_sizes`` is on, :meth:`preallocate` runs here. Over
        several GPUs (``devices``), each gets that budget (:func:`device_budget_bytes`) and the pool's is their
        sum; reservations and commits work on the sum, the device map on the per-GPU budgets.

        Args:
            device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (the first of ``devices`` when given).
            config: the worker's GPU settings.
            source: where device figures come from; None picks :func:`source_for_device` (summed over
                ``devices`` by :class:`MultiDeviceMemorySource`).
            resident_bytes: returns the bytes resident models hold now (the model cache's ``used_bytes``).
            devices: every device the pool spans, for a worker owning several GPUs; None: ``device`` only.

        Returns:
            The pool.

        Raises:
            ConfigError: the explicit budget is larger than a device.
        """
        if devices is not None and len(devices) > 1:
            sources = [source_for_device(d) for d in devices]
            budgets = [device_budget_bytes(d, s.total_bytes(), config) for d, s in zip(devices, sources, strict=True)]
            source = source if source is not None else MultiDeviceMemorySource(sources)
        else:
            source = source if source is not None else source_for_device(device)
            budgets = [device_budget_bytes(device, source.total_bytes(), config)]
        pool_config = config.memory_pool
        pool = cls(
            device,
            budget_bytes=sum(budgets),
            source=source,
            resident_bytes=resident_bytes,
            device_budgets_bytes=budgets,
        )
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
            BudgetExceededError: the reservation does not fit the free budget; nothing is reserved.
        """
        if estimate_bytes < 0:
            raise ConfigError(f"estimate for {model_id!r} must be >= 0 bytes, got {estimate_bytes}")
        if estimate_bytes > self._budget_bytes:
            raise BudgetExceededError(
                f"model {model_id!r} needs {fmt_bytes(estimate_bytes)}; the whole budget of {self.label} is "
                f"{fmt_bytes(self._budget_bytes)}; try a quantized variant or route it to a GPU with more memory"
            )
        # Read outside this pool's lock: the cache calls eviction hooks under its own lock, so taking the two
        # locks in both orders could deadlock two threads.
        resident = self._resident_bytes()
        with self._lock:
            others = {k: v for k, v in self._reservations.items() if k != model_id}
            free = self._budget_bytes - resident - sum(others.values())
            if estimate_bytes > free:
                raise BudgetExceededError(self._refusal(model_id, estimate_bytes, free, resident, others))
            self._reservations[model_id] = estimate_bytes

    def _refusal(self, model_id: str, estimate_bytes: int, free: int, resident: int, others: dict[str, int]) -> str:
        held = f"{fmt_bytes(resident)} held by resident models"
        if others:
            holders = ", ".join(f"{k} ({fmt_bytes(v)})" for k, v in sorted(others.items(), key=lambda kv: -kv[1]))
            held += f", {fmt_bytes(sum(others.values()))} reserved by loads in flight: {holders}"
        return (
            f"model {model_id!r} needs {fmt_bytes(estimate_bytes)}; {self.label} has {fmt_bytes(max(0, free))} "
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
                raise KeyError(f"{model_id!r} holds no reservation on {self.label}; reserve it before loading")
            delta = measured_bytes - self._reservations.pop(model_id)
            reserved = sum(self._reservations.values())
        total = self._resident_bytes() + reserved
        if total > self._budget_bytes:
            logger.warning(
                "%s: %r measured %s (estimate off by %s); resident and reserved now %s, over the %s budget",
                self.label,
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
        segments for later allocations of those sizes (``preallocate_common_sizes``).

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

        from gpufleet.gpu.runtime.oom import translate_oom

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


def _nothing_resident() -> int:
    return 0
