"""Splitting one model across several GPUs: the device map, planned from per-GPU byte budgets on the meta device.

A worker that owns several GPUs (``gpufleet worker --gpus 0,1``) loads a model too big for one of them with
``from_pretrained(device_map=...)``. The map says which GPU holds each block of the model; accelerate's
``infer_auto_device_map`` computes it from the model built on the meta device (no memory, no GPU needed) and
each GPU's budget, never splitting a block the model lists in ``_no_split_modules`` (a decoder layer with its
residual connection). What accelerate would offload to the CPU or disk is refused here instead: a serving
worker keeps every weight on its GPUs, so a model that does not fit raises
:class:`~gpufleet.gpu.errors.BudgetExceededError`.

A budget is what the model's weights may take on a GPU (the pool's ``memory_fraction`` already leaves the headroom
for activations): the room accelerate keeps on the first GPU for bringing offloaded blocks back is handed back
as far as its plan then stays within every budget. (torch, transformers and accelerate are imported lazily.)
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpufleet.gpu.errors import BudgetExceededError, ConfigError, LoadFailedError
from gpufleet.gpu.runtime.model import LoadedModel
from gpufleet.gpu.units import fmt_bytes

if TYPE_CHECKING:
    import torch

    from gpufleet.gpu.runtime.loader import ModelLoader, ProgressFn

__all__ = [
    "DeviceMap",
    "DeviceMapLoader",
    "device_bytes",
    "first_device",
    "meta_model",
    "plan_device_map",
    "planned_bytes",
]

log = logging.getLogger(__name__)

# Module name ("" for the whole model) -> GPU index (within the process's visible devices), or "cpu"/"disk" as
# accelerate writes them; plan_device_map only ever returns GPU indices.
DeviceMap = dict[str, int | str]

# Meta models are cheap but not free to build (a config parse and one module per block): a worker plans the same
# model again on every load after an eviction, so keep the last few.
_META_CACHE_SIZE = 8


def plan_device_map(
    model_dir: Path, dtype: str, budgets_bytes: Sequence[int], *, trust_remote_code: bool = False
) -> DeviceMap:
    """Which GPU holds each block of the model, so that no GPU holds more than its budget.

    Args:
        model_dir: a model directory with ``config.json`` (the weights are not read).
        dtype: the served dtype (``"float32"``, ``"float16"`` or ``"bfloat16"``): the bytes per weight.
        budgets_bytes: bytes the model may take on GPU 0, 1, ... (the process's visible devices, in order).
        trust_remote_code: build custom-code architectures (``auto_map``) from the directory's code.

    Returns:
        ``{module name: GPU index}`` in module order, the form ``from_pretrained(device_map=...)`` takes;
        ``{"": 0}`` when the whole model fits the first GPU.

    Raises:
        ConfigError: no budget, or a negative one.
        LoadFailedError: the config cannot be read or the model cannot be built from it.
        BudgetExceededError: the model does not fit the GPUs' budgets (the message gives its size and the budgets).
    """
    if not budgets_bytes:
        raise ConfigError("plan_device_map needs one budget per GPU; got none")
    if any(budget < 0 for budget in budgets_bytes):
        raise ConfigError(f"GPU budgets must be >= 0 bytes, got {list(budgets_bytes)}")
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes

    model = meta_model(model_dir, dtype, trust_remote_code=trust_remote_code)
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    sizes = compute_module_sizes(model, dtype=_torch_dtype(dtype))
    # accelerate keeps up to the largest block's bytes free on GPU 0, for bringing offloaded blocks back; nothing
    # is offloaded here, so hand that room back (a budget is what models may hold; memory_fraction leaves the
    # headroom). accelerate resizes its reservation as it goes, so the room handed back can overshoot GPU 0's
    # budget: then try less, down to none (accelerate's own plan, which never overshoots).
    largest = _largest_block_bytes(model, sizes, no_split)
    planned: Mapping[str, Any] = {}
    for extra_bytes in (largest, largest // 2, largest // 4, 0):
        max_memory = {i: budget + (extra_bytes if i == 0 else 0) for i, budget in enumerate(budgets_bytes)}
        with warnings.catch_warnings():
            # Its advice on offloading buffers concerns maps with offloaded blocks, which are refused below.
            warnings.filterwarnings("ignore", message=".*buffer for offloaded layers.*", category=UserWarning)
            planned = infer_auto_device_map(
                model, max_memory=max_memory, no_split_module_classes=no_split, dtype=_torch_dtype(dtype)
            )
        held = _held_bytes(planned, sizes)
        if all(isinstance(device, int) and held[device] <= budgets_bytes[device] for device in held):
            break
    left_over = [name or "(the whole model)" for name, device in planned.items() if not isinstance(device, int)]
    if left_over:
        raise BudgetExceededError(
            _no_fit_message(model_dir, sizes[""], dtype, budgets_bytes, largest_bytes=largest, left=left_over)
        )
    return {name: int(device) for name, device in planned.items()}


def planned_bytes(model_dir: Path, dtype: str, *, trust_remote_code: bool = False) -> int:
    """Bytes the model's parameters and buffers take in ``dtype``: what its device map spreads over the GPUs.

    Raises:
        LoadFailedError: the config cannot be read or the model cannot be built from it.
    """
    from accelerate.utils import compute_module_sizes

    model = meta_model(model_dir, dtype, trust_remote_code=trust_remote_code)
    return int(compute_module_sizes(model, dtype=_torch_dtype(dtype))[""])


def first_device(device_map: Mapping[str, int | str]) -> int:
    """The GPU that takes the model's inputs: the one holding its first block (the input embeddings).

    Raises:
        ConfigError: the map is empty or its first block is not on a GPU.
    """
    for device in device_map.values():
        if isinstance(device, int):
            return device
        break
    raise ConfigError(f"device map {dict(device_map)} does not start on a GPU; plan it with plan_device_map")


def device_bytes(module: torch.nn.Module, device_map: Mapping[str, int | str]) -> dict[int, int]:
    """Bytes of parameters and buffers the map puts on each GPU (shared tensors counted once), by GPU index.

    Counted from the module's real tensors and the map's blocks, so it holds wherever the module was placed.
    """
    blocks = sorted(((name, dev) for name, dev in device_map.items() if isinstance(dev, int)), key=lambda b: -len(b[0]))
    seen: set[int] = set()
    held: dict[int, int] = {}
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.data_ptr() in seen and tensor.data_ptr() != 0:
            continue
        seen.add(tensor.data_ptr())
        # The longest block name that is this tensor's module or an ancestor of it ("" holds everything).
        owner = next((dev for block, dev in blocks if not block or name == block or name.startswith(block + ".")), None)
        if owner is not None:
            held[owner] = held.get(owner, 0) + tensor.numel() * tensor.element_size()
    return dict(sorted(held.items()))


def meta_model(model_dir: Path, dtype: str, *, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model of ``model_dir`` with its parameters on the meta device, in ``dtype`` (cached by directory).

    The class is the one ``from_pretrained`` builds for the directory (a causal LM or the bare encoder), so the
    map's module names are the ones it expects.

    Raises:
        LoadFailedError: the config cannot be read or the model cannot be built from it.
    """
    path = Path(model_dir).resolve()
    try:  # part of the cache key: a model re-installed under the same directory is planned afresh
        config_mtime_ns = (path / "config.json").stat().st_mtime_ns
    except OSError as exc:
        raise LoadFailedError(f"{path} has no readable config.json ({exc}); install the model completely") from exc
    return _meta_model(str(path), config_mtime_ns, dtype, trust_remote_code)


@functools.lru_cache(maxsize=_META_CACHE_SIZE)
def _meta_model(model_dir: str, config_mtime_ns: int, dtype: str, trust_remote_code: bool) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from gpufleet.gpu.runtime.checkpoint_io import CHECKPOINT_ERRORS
    from gpufleet.gpu.runtime.model import ModelKind, detect_kind
    from gpufleet.gpu.runtime.skeleton import parameters_on_meta

    path = Path(model_dir)
    auto = AutoModelForCausalLM if detect_kind(path) is ModelKind.CAUSAL_LM else AutoModel
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)
        with parameters_on_meta():
            module: torch.nn.Module = auto.from_config(  # type: ignore[no-untyped-call]
                config, dtype=_torch_dtype(dtype), trust_remote_code=trust_remote_code
            )
    except CHECKPOINT_ERRORS as exc:
        raise LoadFailedError(
            f"could not build the model of {path} to plan its device map: {exc}; check its config.json"
        ) from exc
    return module


def _torch_dtype(name: str) -> torch.dtype:
    from gpufleet.gpu.runtime.checkpoint_io import torch_dtype

    return torch_dtype(name)


def _largest_block_bytes(model: torch.nn.Module, sizes: dict[str, int], no_split: list[str]) -> int:
    """The largest block accelerate will not split, found the way ``infer_auto_device_map`` starts."""
    from accelerate.utils import get_max_layer_size

    top: list[Any] = [
        *model.named_parameters(recurse=False),
        *model.named_children(),
        *model.named_buffers(recurse=False),
    ]
    largest_bytes, _ = get_max_layer_size(top, sizes, no_split)  # sizes: a defaultdict, 0 for tensorless modules
    return int(largest_bytes)


def _held_bytes(planned: Mapping[str, Any], sizes: Mapping[str, int]) -> dict[Any, int]:
    held: dict[Any, int] = {}
    for name, device in planned.items():
        held[device] = held.get(device, 0) + int(sizes.get(name, 0))
    return held


def _no_fit_message(
    model_dir: Path,
    model_bytes: int,
    dtype: str,
    budgets_bytes: Sequence[int],
    *,
    largest_bytes: int,
    left: list[str],
) -> str:
    budgets = ", ".join(f"GPU {i}: {fmt_bytes(b)}" for i, b in enumerate(budgets_bytes))
    return (
        f"model {model_dir.name!r} needs {fmt_bytes(model_bytes)} in {dtype} (its largest unsplittable block "
        f"{fmt_bytes(largest_bytes)}), and its blocks do not fit the free budgets of {len(budgets_bytes)} GPU(s) "
        f"({budgets}; total {fmt_bytes(sum(budgets_bytes))}): {', '.join(left[:4])}{' ...' if len(left) > 4 else ''} "
        "left over. Unload models from this worker, run it on more GPUs (`gpufleet worker --gpus 0,1,...`), or "
        "route the model to a GPU type with more memory, or use a quantized variant"
    )


class DeviceMapLoader:
    """Loads a model across the process's GPUs with a device map planned from their free budgets.

    A model whose map puts it whole on GPU 0 goes through ``single`` (the fast loader), exactly as on a one-GPU
    worker; any other map loads with ``from_pretrained(device_map=...)``, whose hooks move activations from
    block to block. :attr:`LoadedModel.loader` says which path ran; ``LoadedModel.extra`` holds the map
    (``device_map``) and the bytes it put on each GPU (``device_bytes``), and :attr:`LoadedModel.device` is the
    GPU that takes the inputs. On the CPU (``device="cpu"``) every block of the map is placed on the CPU: the
    same plan and module names, one device.

    Args:
        budgets_bytes: returns the bytes each GPU may still take now (budget minus what resident models hold).
        single: the loader for a model that fits GPU 0 whole; None: ``from_pretrained`` with the map for all.
        trust_remote_code: passed to ``from_pretrained`` and to the planning of custom-code architectures.
    """

    name = "device-map"

    def __init__(
        self,
        budgets_bytes: Callable[[], Sequence[int]],
        *,
        single: ModelLoader | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        self.budgets_bytes = budgets_bytes
        self.single = single
        self.trust_remote_code = trust_remote_code

    def load(
        self, model_id: str, path: Path, *, device: str, dtype: str, progress: ProgressFn | None = None
    ) -> LoadedModel:
        """Plan the map against the free per-GPU budgets, then load; see
        :class:`~gpufleet.gpu.runtime.loader.ModelLoader`.

        Raises:
            BudgetExceededError: the model does not fit the GPUs' free budgets (nothing was allocated).
            LoadFailedError: the weights could not be read or placed.
            DeviceOutOfMemoryError: a GPU ran out of memory while placing them.
        """
        budgets = list(self.budgets_bytes())
        device_map = plan_device_map(path, dtype, budgets, trust_remote_code=self.trust_remote_code)
        if device_map == {"": 0} and self.single is not None:
            loaded = self.single.load(model_id, path, device=device, dtype=dtype, progress=progress)
            loaded.loader = f"{loaded.loader} (whole model on GPU 0 of {len(budgets)})"
        else:
            loaded = self._load_mapped(model_id, path, device_map, device=device, dtype=dtype, progress=progress)
        loaded.extra["device_map"] = device_map
        loaded.extra["device_bytes"] = device_bytes(loaded.module, device_map)
        return loaded

    def _load_mapped(
        self,
        model_id: str,
        path: Path,
        device_map: DeviceMap,
        *,
        device: str,
        dtype: str,
        progress: ProgressFn | None,
    ) -> LoadedModel:
        from gpufleet.gpu.runtime.loader import PretrainedLoader

        on_gpus = device.startswith("cuda")
        placement = device_map if on_gpus else dict.fromkeys(device_map, "cpu")
        loaded = PretrainedLoader(trust_remote_code=self.trust_remote_code).load(
            model_id, path, device=device, dtype=dtype, progress=progress, device_map=placement
        )
        # Inputs go where the first block (the embeddings) is; accelerate's hooks carry them on from there.
        loaded.device = f"cuda:{first_device(device_map)}" if on_gpus else device
        gpus = ",".join(str(i) for i in sorted({int(d) for d in device_map.values()}))
        loaded.loader = f"from_pretrained (device map over GPUs {gpus})"
        return loaded
