"""The parked tier: models evicted from the GPU kept in (pinned) host memory, restored at copy speed.

A model evicted from the device cache costs a disk load (safetensors parse, reads, copies) to bring back;
parked, it costs one host→device copy from pinned memory (about 55 GB/s on an H100, against 6 GB/s for
``from_pretrained``). :class:`ParkedStore` holds parked models under a host byte budget
(``MemoryPoolConfig.host_budget_bytes``). The worker runtime calls :meth:`ParkedStore.park` from the model cache's
eviction hook and :meth:`ParkedStore.restore` before a disk load.

The bookkeeping is a :class:`~gpufleet.gpu.runtime.model_cache.ModelCache` sized in host bytes: the same byte-weighted
LRU, feasibility-first eviction and statistics as the device tier. Nothing reads a parked model except
:meth:`ParkedStore.restore`, which takes it out, so its LRU order is parking order: the least recently parked
model goes first. The cache's eviction hook frees the pinned host copy.

torch is imported inside the functions that move tensors; the bookkeeping is plain Python.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpufleet.gpu.errors import BudgetExceededError, ConfigError
from gpufleet.gpu.runtime.model import LoadedModel
from gpufleet.gpu.runtime.model_cache import ModelCache

if TYPE_CHECKING:
    import torch

# Offsets of tensors inside one model's host buffer are rounded up to this, so every view is aligned for any
# dtype and for fast DMA.
ALIGN_BYTES = 512


@dataclass
class _Parked:
    loaded: LoadedModel
    from_device: str
    pinned_memory: bool  # the host buffer is page-locked (restores at copy speed)
    host_buffer: Any  # the flat host tensor every parked tensor is a view of (None when left in place)
    keep_module: bool = False  # set when the model leaves the store alive (restored, or parked again)


class ParkedStore:
    """Models parked in host memory under a byte budget, least recently parked evicted first. Thread-safe.

    Args:
        host_budget_bytes: host memory the parked models may use.

    Raises:
        ConfigError: the budget is not positive (a worker with a budget of 0 creates no store).
    """

    def __init__(self, host_budget_bytes: int) -> None:
        if host_budget_bytes <= 0:
            raise ConfigError(
                f"host_budget_bytes={host_budget_bytes} must be positive for a parked store; set "
                "GPUFLEET_GPU__MEMORY_POOL__HOST_BUDGET_BYTES to a byte count, or to 0 to run without parking"
            )
        self._cache: ModelCache[_Parked] = ModelCache(host_budget_bytes, on_evict=_free_host_copy)
        self._lock = threading.Lock()  # one park or restore at a time: both move a model's tensors
        self._restores = 0
        self._refused = 0

    # -- queries ----------------------------------------------------------------------------------------------

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._cache

    def __len__(self) -> int:
        return len(self._cache)

    @property
    def host_budget_bytes(self) -> int:
        """Host memory the parked models may use."""
        return self._cache.capacity_bytes

    @property
    def used_bytes(self) -> int:
        """Bytes of host memory the parked models hold."""
        return self._cache.used_bytes

    def stats(self) -> dict[str, int]:
        """Counters for status replies: parked count, used/budget bytes, parks, restores, hits, evictions."""
        cache = self._cache.stats()
        return {
            "parked": cache.entries,
            "used_bytes": cache.used_bytes,
            "budget_bytes": cache.capacity_bytes,
            "parks": cache.loads,
            "restores": self._restores,
            "parked_hits": cache.hits,
            "parked_misses": cache.misses,
            "evictions": cache.evictions,
            "refused": self._refused,
        }

    def entries(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per parked model, least recently parked first."""
        listed = []
        for entry in reversed(self._cache.entries()):
            parked = self._cache.peek(entry["key"])
            if parked is None:  # restored between the two reads
                continue
            listed.append(
                {
                    "model_id": entry["key"],
                    "bytes": entry["size_bytes"],
                    "dtype": parked.loaded.dtype,
                    "from_device": parked.from_device,
                    "pinned_memory": parked.pinned_memory,
                    "parked_for_s": round(entry["loaded_s_ago"], 3),
                }
            )
        return listed

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
            earlier = self._cache.peek(loaded.model_id)
            if earlier is not None:
                earlier.keep_module = earlier.loaded is loaded
                self._cache.pop(loaded.model_id)
            try:
                self._cache.make_room(nbytes, for_key=loaded.model_id)
            except BudgetExceededError:
                self._refused += 1
                return False
            from_device = loaded.device
            host_buffer, pinned_memory = _move_to_host(loaded.module)
            self._cache.put(
                loaded.model_id,
                _Parked(loaded=loaded, from_device=from_device, pinned_memory=pinned_memory, host_buffer=host_buffer),
                nbytes,
            )
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
        from gpufleet.gpu.runtime.oom import translate_oom

        with self._lock:
            parked = self._cache.get(model_id)
            if parked is None:
                return None
            started = time.perf_counter()
            with translate_oom(f"restoring parked model {model_id} to {device}"):
                _move_to_device(parked.loaded.module, device)
            parked.keep_module = True
            self._cache.pop(model_id)
            self._restores += 1
        loaded = parked.loaded
        loaded.device = device
        loaded.loader = "parked-restore"
        loaded.load_s = time.perf_counter() - started
        return loaded

    def drop(self, model_id: str) -> bool:
        """Forget a parked model, freeing its host memory; False if it was not parked."""
        with self._lock:
            return self._cache.pop(model_id) is not None


def _free_host_copy(model_id: str, parked: _Parked, reason: str) -> None:
    """The parked cache's eviction hook: let go of the host memory a parked model holds.

    Dropping the store's reference is not enough while someone else still holds the :class:`LoadedModel`:
    its module's tensors are views of the host buffer and keep it alive. So an evicted or dropped model loses
    its module; a restored one (already moved to the device) or one parked again keeps it.
    """
    parked.host_buffer = None
    if not parked.keep_module:
        parked.loaded.module = None


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
