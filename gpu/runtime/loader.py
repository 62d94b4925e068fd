"""Loading models from local directories onto a device (torch and transformers, imported lazily).

:class:`ModelLoader` is the interface the worker runtime uses; :class:`PretrainedLoader` is the reference
implementation (``from_pretrained``). :class:`FastSafetensorsLoader` builds the model skeleton on the meta device
and streams the safetensors bytes straight to the device through reused (pinned) staging buffers, with reads and
host→device copies overlapped; it falls back to :class:`PretrainedLoader` for what it does not handle and says
so in :attr:`LoadedModel.loader`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from gpu.errors import ModelLoadError
from gpu.runtime.inference import LoadedModel, ModelKind, detect_kind, detect_pooling, module_bytes
from gpu.runtime.safetensors_io import (
    CHUNK_ALIGN_BYTES,
    SAFETENSORS_DTYPES,
    Piece,
    StagedReader,
    TensorEntry,
    interleave_files,
    read_safetensors_header,
    safetensors_files,
)
from gpu.units import MiB

if TYPE_CHECKING:
    import torch

__all__ = [
    "FastSafetensorsLoader",
    "ModelLoader",
    "PretrainedLoader",
    "ProgressFn",
    "TensorEntry",
    "load_tokenizer",
    "read_safetensors_header",  # re-exported from gpu.runtime.safetensors_io
    "safetensors_files",  # re-exported from gpu.runtime.safetensors_io
    "torch_dtype",
]

log = logging.getLogger(__name__)

# (bytes done, bytes total). The worker turns it into Celery PROGRESS state.
ProgressFn = Callable[[int, int], None]


class ModelLoader(Protocol):
    """Loads a resolved model directory onto a device."""

    name: str

    def load(
        self, model_id: str, path: Path, *, device: str, dtype: str, progress: ProgressFn | None = None
    ) -> LoadedModel:
        """Load ``path`` onto ``device`` in ``dtype`` ("float32", "float16" or "bfloat16").

        Args:
            model_id: the id the model is served under.
            path: the resolved model directory.
            device: a torch device string ("cpu", "cuda", "cuda:0").
            dtype: the served precision.
            progress: called with (bytes done, bytes total) while weights are placed; last with (total, total).

        Raises:
            ModelLoadError: the weights could not be read or placed.
            DeviceOutOfMemoryError: the device ran out of memory while placing them.
        """
        ...


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for ``"float32"``, ``"float16"`` or ``"bfloat16"``.

    Raises:
        ModelLoadError: the name is not a served dtype.
    """
    import torch

    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise ModelLoadError(f"dtype {name!r} is not served; use float32, float16 or bfloat16") from None


def load_tokenizer(path: Path) -> object:
    """The model's tokenizer, from local files only."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _has_accelerate() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def _load_error(model_id: str, path: Path, exc: BaseException) -> ModelLoadError:
    return ModelLoadError(
        f"could not load {model_id!r} from {path}: {exc}; check that the directory holds config.json, "
        "safetensors weights and tokenizer files"
    )


class PretrainedLoader:
    """``from_pretrained`` onto the device: the reference path every faster loader is checked against."""

    name = "from_pretrained"

    def __init__(self, *, trust_remote_code: bool = False) -> None:
        self.trust_remote_code = trust_remote_code

    def load(
        self, model_id: str, path: Path, *, device: str, dtype: str, progress: ProgressFn | None = None
    ) -> LoadedModel:
        """Load with ``AutoModel(ForCausalLM).from_pretrained(device_map=device)``; see :class:`ModelLoader`.

        ``progress`` is called once, with (total, total), when the weights are in place: ``from_pretrained``
        does not report along the way.
        """
        from gpu.runtime.oom import translate_oom

        started = time.perf_counter()
        kind = detect_kind(path)
        try:
            from transformers import AutoModel, AutoModelForCausalLM

            auto = AutoModelForCausalLM if kind is ModelKind.CAUSAL_LM else AutoModel
            # transformers needs accelerate for any device_map; without it, load on the CPU and move.
            placement = {"device_map": device} if _has_accelerate() else {}
            module: Any
            with translate_oom(f"loading {model_id}"):
                module = auto.from_pretrained(
                    str(path),
                    dtype=torch_dtype(dtype),
                    local_files_only=True,
                    trust_remote_code=self.trust_remote_code,
                    **placement,
                )
                if not placement:
                    module = module.to(device)
            module.eval()
            tokenizer = load_tokenizer(path)
        except (OSError, ValueError, KeyError) as exc:
            raise _load_error(model_id, path, exc) from exc
        n_bytes = module_bytes(module)
        if progress is not None:
            progress(n_bytes, n_bytes)
        return LoadedModel(
            model_id=model_id,
            path=path,
            kind=kind,
            module=module,
            tokenizer=tokenizer,
            device=device,
            dtype=dtype,
            bytes=n_bytes,
            loader=self.name,
            load_s=time.perf_counter() - started,
            pooling=detect_pooling(path),
        )


# --------------------------------------------------------------------------------------------------------------
# The fast loader


class _Fallback(Exception):
    """Internal: the fast path does not handle this checkpoint; the message is the reason."""


@dataclass(frozen=True)
class _Plan:
    pieces: list[Piece]
    total_bytes: int
    unexpected_keys: int


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
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


class FastSafetensorsLoader:
    """Safetensors straight to the device: meta skeleton, parallel ``pread`` into reused staging buffers.

    On CUDA each reader thread owns two pinned staging buffers and a stream: while one buffer's host→device
    copy runs, the thread reads the next piece into the other (double buffering; an event per buffer says
    when it is free again). Pieces of all shards go through one queue, so shards are read in parallel. On the
    CPU the bytes are read straight into the parameters' memory. Host memory used beyond the staging buffers
    is a tensor's worth at most while converting dtypes on the CPU: the model is never copied whole in host
    memory. The reading itself is :class:`gpu.runtime.safetensors_io.StagedReader`'s; this class decides what to read.

    Falls back to :class:`PretrainedLoader` (and names why in ``LoadedModel.loader``) for checkpoints without
    safetensors, quantized ones, custom code, weights transformers converts on load, and keys it cannot match.
    """

    name = "fast-safetensors"

    def __init__(
        self,
        *,
        staging_bytes: int = 256 * MiB,
        read_threads: int | None = None,
        fallback: ModelLoader | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        """Args:
        staging_bytes: pinned host memory for staging on CUDA, split over the threads (two buffers each);
            kept between loads. It also sets the read size (staging_bytes / (2 * threads)) on the CPU.
        read_threads: reader threads; default min(8, CPU count).
        fallback: the loader used for what this one does not handle; default :class:`PretrainedLoader`.
        trust_remote_code: passed to the default fallback; the fast path itself never runs custom code (models
            with an ``auto_map`` always take the fallback).

        Raises:
            ModelLoadError: the staging size leaves no room for a 4 KiB chunk per buffer.
        """
        self.read_threads = max(1, read_threads or min(8, os.cpu_count() or 1))
        # Chunks are whole multiples of 4 KiB: aligned to any element size and to pages.
        self.chunk_bytes = staging_bytes // (2 * self.read_threads) // CHUNK_ALIGN_BYTES * CHUNK_ALIGN_BYTES
        if self.chunk_bytes == 0:
            raise ModelLoadError(
                f"staging_bytes={staging_bytes} is too small for {self.read_threads} reader threads; give at "
                f"least {2 * self.read_threads * CHUNK_ALIGN_BYTES} bytes (64 MiB or more for real models)"
            )
        self.staging_bytes = 2 * self.read_threads * self.chunk_bytes
        self.fallback: ModelLoader = (
            fallback if fallback is not None else PretrainedLoader(trust_remote_code=trust_remote_code)
        )
        self._reader = StagedReader(read_threads=self.read_threads, chunk_bytes=self.chunk_bytes)
        self._lock = threading.Lock()  # one load at a time: the skeleton patch and the staging are shared

    def load(
        self, model_id: str, path: Path, *, device: str, dtype: str, progress: ProgressFn | None = None
    ) -> LoadedModel:
        """Load ``path`` onto ``device`` in ``dtype``; see :class:`ModelLoader`.

        Raises:
            ModelLoadError: the weights could not be read or placed.
            DeviceOutOfMemoryError: the device ran out of memory while placing them.
        """
        from gpu.runtime.oom import translate_oom

        started = time.perf_counter()
        with self._lock:
            try:
                with translate_oom(f"loading {model_id}"):
                    loaded = self._load_fast(model_id, path, device=device, dtype=dtype, progress=progress)
            except _Fallback as reason:
                log.warning("fast loader falls back to from_pretrained for %s: %s", model_id, reason)
                loaded = self.fallback.load(model_id, path, device=device, dtype=dtype, progress=progress)
                loaded.loader = f"{self.fallback.name} (fallback: {reason})"
                loaded.load_s = time.perf_counter() - started
                return loaded
        loaded.load_s = time.perf_counter() - started
        return loaded

    def release_staging(self) -> None:
        """Free the pinned staging buffers (they are allocated again by the next CUDA load)."""
        with self._lock:
            self._reader.release_staging()

    # -- the fast path --------------------------------------------------------------------------------------

    def _load_fast(
        self, model_id: str, path: Path, *, device: str, dtype: str, progress: ProgressFn | None
    ) -> LoadedModel:
        import torch

        target_dtype = torch_dtype(dtype)
        target = torch.device(device)
        files = safetensors_files(path)
        if not files:
            raise _Fallback("no safetensors weights")
        raw_config = _read_config(path)
        if raw_config.get("quantization_config"):
            method = raw_config["quantization_config"].get("quant_method", "unknown")
            raise _Fallback(f"quantized checkpoint ({method})")
        if raw_config.get("auto_map"):
            raise _Fallback("custom code architecture (auto_map)")
        kind = detect_kind(path)
        try:
            entries: dict[str, TensorEntry] = {}
            for file in files:
                entries.update(read_safetensors_header(file))
            module: Any = _build_skeleton(path, kind, target_dtype)
            tokenizer = load_tokenizer(path)
        except (OSError, ValueError, KeyError) as exc:
            raise _load_error(model_id, path, exc) from exc
        _check_supported(module, entries, target_dtype)

        fds = {file: os.open(file, os.O_RDONLY) for file in files}
        try:
            plan = self._plan(module, entries, fds, target)
            try:
                self._reader.read(plan.pieces, plan.total_bytes, target, progress)
            except OSError as exc:
                raise ModelLoadError(
                    f"reading the weights of {model_id!r} from {path} failed: {exc}; check the files are "
                    "complete and readable (re-download if truncated)"
                ) from exc
        finally:
            for fd in fds.values():
                os.close(fd)
        for buffer_owner, name, buffer in _named_buffer_slots(module):
            if buffer.device != target:
                buffer_owner._buffers[name] = buffer.to(target)
        module.tie_weights()
        module.eval()
        _load_generation_config(module, path)
        return LoadedModel(
            model_id=model_id,
            path=path,
            kind=kind,
            module=module,
            tokenizer=tokenizer,
            device=device,
            dtype=dtype,
            bytes=module_bytes(module),
            loader=self.name,
            pooling=detect_pooling(path),
            extra={"unexpected_keys": plan.unexpected_keys, "read_threads": self.read_threads},
        )

    def _plan(
        self, module: torch.nn.Module, entries: dict[str, TensorEntry], fds: dict[Path, int], target: torch.device
    ) -> _Plan:
        """Match module keys to checkpoint tensors, put empty tensors on the device and cut the reads.

        Everything that can make the fast path give up is checked before the first device allocation.
        """
        import torch

        matches = _match_keys(module, _renamed_entries(module, entries))
        replacements: dict[int, torch.Tensor] = {}
        pieces: list[Piece] = []
        for meta, entry in matches.values():
            src_dtype = getattr(torch, SAFETENSORS_DTYPES[entry.dtype])
            dest = torch.empty(tuple(meta.shape), dtype=meta.dtype, device=target)
            if isinstance(meta, torch.nn.Parameter):
                dest = torch.nn.Parameter(dest, requires_grad=meta.requires_grad)
            replacements[id(meta)] = dest
            pieces.extend(self._reader.cut(entry, fds[entry.file], dest.detach().view(-1), src_dtype))
        for owner in module.modules():
            for name, param in owner._parameters.items():
                if param is not None and id(param) in replacements:
                    owner._parameters[name] = replacements[id(param)]  # type: ignore[assignment]
            for name, buffer in owner._buffers.items():
                if buffer is not None and id(buffer) in replacements:
                    owner._buffers[name] = replacements[id(buffer)]
        pieces = interleave_files(pieces)  # several files are read at once
        used = {id(entry) for _, entry in matches.values()}
        unexpected = sum(1 for entry in entries.values() if id(entry) not in used)
        return _Plan(pieces, sum(p.nbytes for p in pieces), unexpected)


# --------------------------------------------------------------------------------------------------------------
# helpers of the fast path


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {exc}; the model directory is incomplete") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path / 'config.json'} is not a JSON object; the model directory is corrupt")
    return config


def _build_skeleton(path: Path, kind: ModelKind, dtype: torch.dtype) -> torch.nn.Module:
    """The model with parameters on the meta device and buffers computed for real on the CPU."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    auto = AutoModelForCausalLM if kind is ModelKind.CAUSAL_LM else AutoModel
    with _parameters_on_meta():
        module: torch.nn.Module = auto.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    return module


def _check_supported(module: torch.nn.Module, entries: dict[str, TensorEntry], dtype: torch.dtype) -> None:
    """Raise :class:`_Fallback` for what only ``from_pretrained`` does right."""
    import torch

    odd = sorted({e.dtype for e in entries.values()} - set(SAFETENSORS_DTYPES))
    if odd:
        raise _Fallback(f"checkpoint dtypes {', '.join(odd)} are not handled")
    if getattr(module, "_keep_in_fp32_modules_strict", None) and dtype in (torch.float16, torch.bfloat16):
        raise _Fallback("the model keeps some modules in float32")
    if getattr(module, "_keep_in_fp32_modules", None) and dtype == torch.float16:
        raise _Fallback("the model keeps some modules in float32 under float16")


def _renamed_entries(module: torch.nn.Module, entries: dict[str, TensorEntry]) -> dict[str, TensorEntry]:
    """The checkpoint under the names the model uses, after transformers' load-time renamings.

    transformers 5 renames some checkpoint keys as it loads (GPT-NeoX ``embed_out`` → ``lm_head``, legacy
    ``LayerNorm.gamma`` → ``weight``); the same renamings are applied here, from transformers' own table. Keys
    that a converter would transform (merged MoE experts, permuted rotary weights) make the fast path give up.

    Raises:
        _Fallback: a checkpoint key needs a conversion beyond a rename.
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
                raise _Fallback(f"transformers converts {key!r} on load ({type(module).__name__})")
        renamed.setdefault(name, entry)
    return renamed


def _match_keys(
    module: torch.nn.Module, entries: dict[str, TensorEntry]
) -> dict[int, tuple[torch.Tensor, TensorEntry]]:
    """For each distinct tensor of the state dict (tied ones once), its checkpoint entry.

    Raises:
        _Fallback: weights missing from the checkpoint, shapes that differ, or state the fast path cannot set.
        ModelLoadError: an entry's byte count does not fit its shape and dtype (a corrupt file).
    """
    import torch

    prefix = getattr(module, "base_model_prefix", "") or ""
    ignore_missing = _compile_patterns(getattr(module, "_keys_to_ignore_on_load_missing", None))
    buffers = {id(buffer) for _, _, buffer in _named_buffer_slots(module)}
    keys_of: dict[int, list[str]] = {}
    tensor_of: dict[int, torch.Tensor] = {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        if not isinstance(tensor, torch.Tensor):
            raise _Fallback(f"extra state {key!r} in the model")
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
            raise _Fallback(
                f"shape of {source!r} is {list(entry.shape)} in the checkpoint, {list(meta.shape)} in the model"
            )
        itemsize = getattr(torch, SAFETENSORS_DTYPES[entry.dtype]).itemsize
        if entry.nbytes != meta.numel() * itemsize:
            raise ModelLoadError(
                f"{entry.file}: tensor {source!r} holds {entry.nbytes} bytes, its shape and dtype need "
                f"{meta.numel() * itemsize}; the file is corrupt, re-download the weights"
            )
        matches[tensor_id] = (meta, entry)
    if missing:
        raise _Fallback(
            f"{len(missing)} model weights not found in the checkpoint (e.g. {missing[0]!r}); "
            "transformers may rename or convert them"
        )
    loaded = {id(meta) for meta, _ in matches.values()}
    leftover = [name for name, p in module.named_parameters() if p.device.type == "meta" and id(p) not in loaded]
    if leftover:
        raise _Fallback(f"{len(leftover)} parameters are outside the state dict (e.g. {leftover[0]!r})")
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


def _named_buffer_slots(module: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, str, torch.Tensor]]:
    """(owning module, name, buffer) for every buffer, non-persistent ones included."""
    for owner in module.modules():
        for name, buffer in owner._buffers.items():
            if buffer is not None:
                yield owner, name, buffer


def _load_generation_config(module: Any, path: Path) -> None:
    """What ``from_pretrained`` does after loading: the directory's generation_config.json, if any."""
    if not (path / "generation_config.json").is_file() or not hasattr(module, "generation_config"):
        return
    from transformers import GenerationConfig

    try:
        module.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
    except OSError as exc:
        log.warning("ignoring unreadable %s: %s", path / "generation_config.json", exc)
