"""The parked tier: models evicted from the GPU kept in (pinned) host memory, restored at copy speed.

A model evicted from the device cache costs a disk load (safetensors parse, reads, copies) to bring back;
parked, it costs one host→device copy from pinned memory (about 55 GB/s on an H100, against 6 GB/s for
``from_pretrained``). :class:`ParkedStore` holds parked models under a host byte budget
(``MemoryPoolConfig.host_budget_bytes``), evicting the least recently parked first. The worker runtime calls
:meth:`ParkedStore.park` from the model cache's eviction hook and :meth:`ParkedStore.restore` before a disk load.

torch is imported inside the methods that move tensors; the bookkeeping is plain Python.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpu.errors import ConfigError
from gpu.runtime.inference import LoadedModel

if TYPE_CHECKING:
    import torch

# Offsets of tensors inside one model's host buffer are rounded up to this, so every view is aligned for any
# dtype and for fast DMA.
ALIGN_BYTES = 512


@dataclass
class _Entry:
    loaded: LoadedModel
    nbytes: int
    from_device: str
    parked_at_s: float  # time.time() when parked
    pinned: bool
    host_buffer: Any  # the flat host tensor every parked tensor is a view of (None when left in place)


class ParkedStore:
    """Models parked in host memory under a byte budget, least recently parked evicted first."""

    def __init__(self, host_budget_bytes: int) -> None:
        """Args:
            host_budget_bytes: host memory the parked models may use (0 disables parking).

        Raises:
            ConfigError: the budget is negative.
        """
        if host_budget_bytes < 0:
            raise ConfigError(
                f"host_budget_bytes={host_budget_bytes} is negative; set "
                "GPUFLEET_GPU__MEMORY_POOL__HOST_BUDGET_BYTES to 0 (off) or a byte count"
            )
        self.host_budget_bytes = host_budget_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # oldest first
        self._lock = threading.Lock()
        self._parks = 0
        self._restores = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._refused = 0

    # -- queries ----------------------------------------------------------------------------------------------

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def used_bytes(self) -> int:
        """Bytes of host memory the parked models hold."""
        return sum(entry.nbytes for entry in self._entries.values())

    def stats(self) -> dict[str, int]:
        """Counters for status replies: parked count, used/budget bytes, parks, restores, hits, evictions."""
        with self._lock:
            return {
                "parked": len(self._entries),
                "used_bytes": self.used_bytes,
                "budget_bytes": self.host_budget_bytes,
                "parks": self._parks,
                "restores": self._restores,
                "parked_hits": self._hits,
                "parked_misses": self._misses,
                "evictions": self._evictions,
                "refused": self._refused,
            }

    def entries(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per parked model, oldest first."""
        now_s = time.time()
        with self._lock:
            return [
                {
                    "model_id": model_id,
                    "bytes": entry.nbytes,
                    "dtype": entry.loaded.dtype,
                    "from_device": entry.from_device,
                    "pinned": entry.pinned,
                    "parked_for_s": round(now_s - entry.parked_at_s, 3),
                }
                for model_id, entry in self._entries.items()
            ]

    # -- park / restore / drop --------------------------------------------------------------------------------

    def park(self, loaded: LoadedModel) -> bool:
        """Move ``loaded``'s parameters and buffers to host memory, if they fit the budget.

        Older parked models are evicted (least recently parked first) to make room. From a CUDA device the
        tensors are copied into one pinned host buffer, so :meth:`restore` runs at copy speed; a model already
        in host memory (CPU-only machines) stays where it is and is only accounted. Tied weights stay tied.
        A model of the same id parked earlier is replaced.

        Args:
            loaded: the model leaving the device; after a True return its module lives in host memory.

        Returns:
            False when the model alone is bigger than the budget (nothing is evicted then).
        """
        nbytes = _tensor_bytes(loaded.module)
        with self._lock:
            self._entries.pop(loaded.model_id, None)
            if nbytes > self.host_budget_bytes:
                self._refused += 1
                return False
            while self._entries and self.used_bytes + nbytes > self.host_budget_bytes:
                self._entries.popitem(last=False)
                self._evictions += 1
        from_device = loaded.device
        host_buffer, pinned = _move_to_host(loaded.module)
        with self._lock:
            self._entries[loaded.model_id] = _Entry(
                loaded=loaded,
                nbytes=nbytes,
                from_device=from_device,
                parked_at_s=time.time(),
                pinned=pinned,
                host_buffer=host_buffer,
            )
            self._parks += 1
        loaded.device = "cpu"
        return True

    def restore(self, model_id: str, device: str) -> LoadedModel | None:
        """Copy a parked model back to ``device`` and take it out of the store.

        Copies are ``non_blocking`` from pinned memory and synchronized once at the end. The returned model has
        ``loader="parked-restore"`` and ``load_s`` set to the restore time.

        Args:
            model_id: the parked model.
            device: where it goes ("cuda", "cuda:0", "cpu").

        Returns:
            The model on ``device``, or None when it is not parked.

        Raises:
            DeviceOutOfMemoryError: the device cannot hold it; the model stays parked.
        """
        from gpu.runtime.oom import translate_oom

        with self._lock:
            entry = self._entries.get(model_id)
            if entry is None:
                self._misses += 1
                return None
            self._hits += 1
        started = time.perf_counter()
        with translate_oom(f"restoring parked model {model_id} to {device}"):
            _move_to_device(entry.loaded.module, device)
        with self._lock:
            self._entries.pop(model_id, None)
            self._restores += 1
        loaded = entry.loaded
        loaded.device = device
        loaded.loader = "parked-restore"
        loaded.load_s = time.perf_counter() - started
        return loaded

    def drop(self, model_id: str) -> bool:
        """Forget a parked model, freeing its host memory; False if it was not parked."""
        with self._lock:
            return self._entries.pop(model_id, None) is not None


# --------------------------------------------------------------------------------------------------------------
# moving tensors


def _unique_tensors(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str, bool, torch.Tensor]]:
    """(owner, name, is_parameter, tensor) for each parameter and buffer slot; shared tensors appear per slot."""
    slots: list[tuple[torch.nn.Module, str, bool, torch.Tensor]] = []
    for owner in module.modules():
        slots.extend((owner, name, True, p) for name, p in owner._parameters.items() if p is not None)
        slots.extend((owner, name, False, b) for name, b in owner._buffers.items() if b is not None)
    return slots


def _tensor_bytes(module: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for _, _, _, tensor in _unique_tensors(module):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def _align(n_bytes: int) -> int:
    return (n_bytes + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


def _move_to_host(module: torch.nn.Module) -> tuple[Any, bool]:
    """Copy every device tensor of ``module`` into one pinned host buffer and point the module at the copies.

    Returns:
        (the host buffer or None when everything already was in host memory, whether it is pinned).
    """
    import torch

    slots = _unique_tensors(module)
    on_device: dict[int, torch.Tensor] = {}
    for _, _, _, tensor in slots:
        if tensor.device.type != "cpu":
            on_device.setdefault(id(tensor), tensor)
    if not on_device:
        return None, False
    offsets: dict[int, int] = {}
    total = 0
    for key, tensor in on_device.items():
        offsets[key] = total
        total += _align(tensor.numel() * tensor.element_size())
    pinned = torch.cuda.is_available()
    host_buffer = torch.empty(total, dtype=torch.uint8, pin_memory=pinned)
    copies: dict[int, torch.Tensor] = {}
    for key, tensor in on_device.items():
        nbytes = tensor.numel() * tensor.element_size()
        view = host_buffer[offsets[key] : offsets[key] + nbytes].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor.contiguous(), non_blocking=pinned)
        copies[key] = view
    if pinned:
        torch.cuda.synchronize()
    _swap(slots, copies)
    return host_buffer, pinned


def _move_to_device(module: torch.nn.Module, device: str) -> None:
    """Copy every tensor of ``module`` to ``device`` (all allocations first, so a failure changes nothing)."""
    import torch

    target = torch.device(device)
    slots = _unique_tensors(module)
    copies: dict[int, torch.Tensor] = {}
    for _, _, _, tensor in slots:
        if id(tensor) in copies or tensor.device == target:
            continue
        copies[id(tensor)] = torch.empty_like(tensor, device=target)
    if not copies:
        return
    sources = {id(t): t for _, _, _, t in slots}
    for key, dest in copies.items():
        dest.copy_(sources[key], non_blocking=True)
    if target.type == "cuda":
        torch.cuda.synchronize(target)
    _swap(slots, copies)


def _swap(slots: list[tuple[torch.nn.Module, str, bool, torch.Tensor]], copies: dict[int, torch.Tensor]) -> None:
    """Point every slot at its copy; parameters keep their identity (``.data``), so ties and references hold."""
    for owner, name, is_parameter, tensor in slots:
        new = copies.get(id(tensor))
        if new is None:
            continue
        if is_parameter:
            tensor.data = new
        else:
            owner._buffers[name] = new
