"""The fast loader's model skeleton: built on the meta device, then matched key by key to a checkpoint.

:func:`build_skeleton` makes the model from its config with parameters on the meta device (no memory) and
buffers computed for real; :func:`match_keys` pairs each of its tensors with a safetensors entry, after
transformers' own load-time renamings (:func:`renamed_entries`). Whatever only ``from_pretrained`` does right
raises :class:`Unsupported`, before anything is allocated on the device, and the loader falls back.
(torch and transformers are imported lazily.)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpufleet.gpu.checkpoint_format import TensorEntry
from gpufleet.gpu.errors import LoadFailedError
from gpufleet.gpu.runtime.model import ModelKind
from gpufleet.gpu.units import torch_name_of_code

# The safetensors codes the fast loader reads; anything else (FP8, unsigned wider than a byte) goes to the
# fallback, from_pretrained.
FAST_CODES = frozenset({"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"})

if TYPE_CHECKING:
    import torch

__all__ = [
    "Unsupported",
    "build_skeleton",
    "check_supported",
    "match_keys",
    "named_buffer_slots",
    "parameters_on_meta",
    "renamed_entries",
]


class Unsupported(Exception):
    """The fast path does not handle this checkpoint; the message is the reason. The fast loader catches it
    and falls back to ``from_pretrained``: it never leaves :mod:`gpufleet.gpu.runtime`."""


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Register every new parameter on the meta device while buffers stay real.

    Non-persistent buffers (rotary ``inv_freq``, ``position_ids``) are not in checkpoints: building them for real
    in ``__init__`` (on the CPU, small) gives exactly the values ``from_pretrained`` ends with, while parameters,
    which the checkpoint fills anyway, cost nothing. Patches ``nn.Module.register_parameter`` for the duration
    (as accelerate's ``init_empty_weights(include_buffers=False)`` does), so build one model at a time.
    """
    import torch

    original = torch.nn.Module.register_parameter

    def register_on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            meta = torch.nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
            # transformers' init functions skip tensors flagged as initialized: initializing meta tensors is
            # pure overhead (about 1 ms per tensor), while buffers still get their real init.
            meta._is_hf_initialized = True  # type: ignore[attr-defined]
            module._parameters[name] = meta

    torch.nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_skeleton(path: Path, kind: ModelKind, dtype: torch.dtype) -> torch.nn.Module:
    """The model with parameters on the meta device and buffers computed for real on the CPU."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    auto = AutoModelForCausalLM if kind is ModelKind.CAUSAL_LM else AutoModel
    with parameters_on_meta():
        module: torch.nn.Module = auto.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    return module


def check_supported(module: torch.nn.Module, entries: dict[str, TensorEntry], dtype: torch.dtype) -> None:
    """Raise :class:`Unsupported` for what only ``from_pretrained`` does right."""
    import torch

    odd = sorted({e.dtype for e in entries.values()} - FAST_CODES)
    if odd:
        raise Unsupported(f"checkpoint dtypes {', '.join(odd)} are not handled")
    if getattr(module, "_keep_in_fp32_modules_strict", None) and dtype in (torch.float16, torch.bfloat16):
        raise Unsupported("the model keeps some modules in float32")
    if getattr(module, "_keep_in_fp32_modules", None) and dtype == torch.float16:
        raise Unsupported("the model keeps some modules in float32 under float16")


def renamed_entries(module: torch.nn.Module, entries: dict[str, TensorEntry]) -> dict[str, TensorEntry]:
    """The checkpoint under the names the model uses, after transformers' load-time renamings.

    transformers 5 renames some checkpoint keys as it loads (GPT-NeoX ``embed_out`` → ``lm_head``, legacy
    ``LayerNorm.gamma`` → ``weight``); the same renamings are applied here, from transformers' own table. Keys
    that a converter would transform (merged MoE experts, permuted rotary weights) make the fast path give up.

    Raises:
        Unsupported: a checkpoint key needs a conversion beyond a rename.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, apply_renamings
    except ImportError:  # transformers 4: renames only through the base-model prefix, handled by the matcher
        return entries
    transforms = get_model_conversion_mapping(module)  # type: ignore[arg-type]
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamed: dict[str, TensorEntry] = {}
    for key, entry in entries.items():
        name = apply_renamings(key, renamings)
        for converter in converters:
            if converter.rename_source_key(name)[1] is not None:
                raise Unsupported(f"transformers converts {key!r} on load ({type(module).__name__})")
        renamed.setdefault(name, entry)
    return renamed


def match_keys(module: torch.nn.Module, entries: dict[str, TensorEntry]) -> dict[int, tuple[torch.Tensor, TensorEntry]]:
    """For each distinct tensor of the state dict (tied ones once), its checkpoint entry.

    Raises:
        Unsupported: weights missing from the checkpoint, shapes that differ, or state the fast path cannot set.
        LoadFailedError: an entry's byte count does not fit its shape and dtype (a corrupt file).
    """
    import torch

    prefix = getattr(module, "base_model_prefix", "") or ""
    ignore_missing = _compile_patterns(getattr(module, "_keys_to_ignore_on_load_missing", None))
    buffers = {id(buffer) for _, _, buffer in named_buffer_slots(module)}
    keys_of: dict[int, list[str]] = {}
    tensor_of: dict[int, torch.Tensor] = {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        if not isinstance(tensor, torch.Tensor):
            raise Unsupported(f"extra state {key!r} in the model")
        keys_of.setdefault(id(tensor), []).append(key)
        tensor_of[id(tensor)] = tensor
    matches: dict[int, tuple[torch.Tensor, TensorEntry]] = {}
    missing: list[str] = []
    for tensor_id, keys in keys_of.items():
        meta = tensor_of[tensor_id]
        # Tied tensors have several keys; any one found in the checkpoint fills them all.
        source = next((c for key in keys for c in _candidates(key, prefix) if c in entries), None)
        if source is None:
            if tensor_id in buffers or (ignore_missing and ignore_missing.search(keys[0])):
                continue  # a buffer keeps its __init__ value, the one from_pretrained's init gives it too
            missing.append(keys[0])
            continue
        entry = entries[source]
        if tuple(meta.shape) != entry.shape:
            raise Unsupported(
                f"shape of {source!r} is {list(entry.shape)} in the checkpoint, {list(meta.shape)} in the model"
            )
        itemsize = getattr(torch, torch_name_of_code(entry.dtype)).itemsize
        if entry.nbytes != meta.numel() * itemsize:
            raise LoadFailedError(
                f"{entry.file}: tensor {source!r} holds {entry.nbytes} bytes, its shape and dtype need "
                f"{meta.numel() * itemsize}; the file is corrupt, re-download the weights"
            )
        matches[tensor_id] = (meta, entry)
    if missing:
        raise Unsupported(
            f"{len(missing)} model weights not found in the checkpoint (e.g. {missing[0]!r}); "
            "transformers may rename or convert them"
        )
    loaded = {id(meta) for meta, _ in matches.values()}
    leftover = [name for name, p in module.named_parameters() if p.device.type == "meta" and id(p) not in loaded]
    if leftover:
        raise Unsupported(f"{len(leftover)} parameters are outside the state dict (e.g. {leftover[0]!r})")
    return matches


def _candidates(key: str, prefix: str) -> list[str]:
    """Checkpoint names a module key may have: itself, without the base-model prefix, or with it."""
    names = [key]
    if prefix:
        if key.startswith(prefix + "."):
            names.append(key[len(prefix) + 1 :])
        else:
            names.append(f"{prefix}.{key}")
    return names


def _compile_patterns(patterns: Any) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{p})" for p in patterns))


def named_buffer_slots(module: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, str, torch.Tensor]]:
    """(owning module, name, buffer) for every buffer, non-persistent ones included."""
    for owner in module.modules():
        for name, buffer in owner._buffers.items():
            if buffer is not None:
                yield owner, name, buffer
