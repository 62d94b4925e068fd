"""Loading models from local directories onto a device (torch and transformers, imported lazily).

:class:`ModelLoader` is the interface the worker runtime uses; :class:`PretrainedLoader` is the reference
implementation (``from_pretrained``). :class:`FastSafetensorsLoader` builds the model skeleton on the meta device
and streams the safetensors bytes straight to the device through reused (pinned) staging buffers, with reads and
host→device copies overlapped; it falls back to :class:`PretrainedLoader` for what it does not handle and says
so in :attr:`LoadedModel.loader`. The skeleton and the matching of its keys to the checkpoint are
:mod:`gpufleet.gpu.runtime.skeleton`'s; reading the bytes is :mod:`gpufleet.gpu.runtime.safetensors_io`'s.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from gpufleet.gpu.checkpoint_format import TensorEntry, read_header, weight_files
from gpufleet.gpu.errors import LoadFailedError, ModelSpecError
from gpufleet.gpu.runtime.checkpoint_io import CHECKPOINT_ERRORS, load_tokenizer, torch_dtype
from gpufleet.gpu.runtime.gguf_loader import load_gguf
from gpufleet.gpu.runtime.model import LoadedModel, ModelKind, detect_kind, detect_pooling, is_gguf_model, module_bytes
from gpufleet.gpu.runtime.quantization import check_quantized
from gpufleet.gpu.runtime.safetensors_io import CHUNK_ALIGN_BYTES, Piece, StagedReader, interleave_files
from gpufleet.gpu.runtime.skeleton import (
    Unsupported,
    build_skeleton,
    check_supported,
    match_keys,
    named_buffer_slots,
    renamed_entries,
)
from gpufleet.gpu.units import MiB, torch_name_of_code

if TYPE_CHECKING:
    import torch

__all__ = [
    "FastSafetensorsLoader",
    "ModelLoader",
    "PretrainedLoader",
    "ProgressFn",
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
            LoadFailedError: the weights could not be read or placed.
            DeviceOutOfMemoryError: the device ran out of memory while placing them.
        """
        ...


def _has_accelerate() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def _load_error(model_id: str, path: Path, exc: BaseException) -> LoadFailedError:
    return LoadFailedError(
        f"could not load {model_id!r} from {path}: {exc}; check that the directory holds config.json, "
        "safetensors weights and tokenizer files"
    )


class PretrainedLoader:
    """``from_pretrained`` onto the device: the reference path every faster loader is checked against."""

    name = "from_pretrained"

    def __init__(self, *, trust_remote_code: bool = False) -> None:
        self.trust_remote_code = trust_remote_code

    def load(
        self,
        model_id: str,
        path: Path,
        *,
        device: str,
        dtype: str,
        progress: ProgressFn | None = None,
        device_map: Mapping[str, int | str] | None = None,
    ) -> LoadedModel:
        """Load with ``AutoModel(ForCausalLM).from_pretrained(device_map=device)``; see :class:`ModelLoader`.

        ``progress`` is called once, with (total, total), when the weights are in place: ``from_pretrained``
        does not report along the way. ``device_map`` (module name -> device), when given, spreads the model
        instead (:mod:`gpufleet.gpu.runtime.device_map` computes it); the result's ``device`` is still ``device``.
        A GGUF model is loaded dequantized (:mod:`gpufleet.gpu.runtime.gguf_loader`); a multimodal checkpoint with its
        image-text-to-text class (its text generation is served); a quantized checkpoint only after
        :func:`gpufleet.gpu.runtime.quantization.check_quantized` found its kernels and GPU here.

        Raises:
            UnsupportedQuantizationError: a quantized checkpoint this device cannot run (before any weight is read).
        """
        from gpufleet.gpu.runtime.oom import translate_oom

        started = time.perf_counter()
        # transformers needs accelerate for any device_map; without it, load on the CPU and move.
        placement: dict[str, Any] = {}
        if device_map is not None:
            placement = {"device_map": dict(device_map)}
        elif _has_accelerate():
            placement = {"device_map": device}
        if is_gguf_model(path):
            loaded = load_gguf(
                model_id,
                path,
                device=device,
                dtype=dtype,
                placement=placement,
                trust_remote_code=self.trust_remote_code,
            )
            if progress is not None:
                progress(loaded.bytes, loaded.bytes)
            return loaded
        # Before any weight is read: the fast loader hands every quantized checkpoint to this loader, having read
        # only config.json and the list of weight files.
        check_quantized(model_id, path, device)
        kind = detect_kind(path)
        try:
            auto = _auto_class(path, kind)
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
        except CHECKPOINT_ERRORS as exc:
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


@dataclass(frozen=True)
class _Plan:
    pieces: list[Piece]
    total_bytes: int
    unexpected_keys: int


class FastSafetensorsLoader:
    """Safetensors straight to the device: meta skeleton, parallel ``pread`` into reused staging buffers.

    On CUDA each reader thread owns two pinned staging buffers and a stream: while one buffer's host→device
    copy runs, the thread reads the next piece into the other (double buffering; an event per buffer says
    when it is free again). Pieces of all shards go through one queue, so shards are read in parallel. On the
    CPU the bytes are read straight into the parameters' memory. Host memory used beyond the staging buffers
    is a tensor's worth at most while converting dtypes on the CPU: the model is never copied whole in host
    memory. The reading itself is :class:`gpufleet.gpu.runtime.safetensors_io.StagedReader`'s; this class decides what
    to read.

    Falls back to :class:`PretrainedLoader` (and names why in ``LoadedModel.loader``) for checkpoints without
    safetensors, quantized ones (which it refuses where this device cannot run them), GGUF files, multimodal
    checkpoints, custom code, weights transformers converts on load, and keys it cannot match.
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
            LoadFailedError: the staging size leaves no room for a 4 KiB chunk per buffer.
        """
        self.read_threads = max(1, read_threads or min(8, os.cpu_count() or 1))
        # Chunks are whole multiples of 4 KiB: aligned to any element size and to pages.
        self.chunk_bytes = staging_bytes // (2 * self.read_threads) // CHUNK_ALIGN_BYTES * CHUNK_ALIGN_BYTES
        if self.chunk_bytes == 0:
            raise LoadFailedError(
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
            LoadFailedError: the weights could not be read or placed.
            DeviceOutOfMemoryError: the device ran out of memory while placing them.
        """
        from gpufleet.gpu.runtime.oom import translate_oom

        started = time.perf_counter()
        with self._lock:
            try:
                with translate_oom(f"loading {model_id}"):
                    loaded = self._load_fast(model_id, path, device=device, dtype=dtype, progress=progress)
            except Unsupported as reason:
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
        if is_gguf_model(path):
            raise Unsupported("GGUF file (transformers dequantizes it)")
        files = weight_files(path).safetensors
        if not files:
            raise Unsupported("no safetensors weights")
        raw_config = _read_config(path)
        if raw_config.get("quantization_config"):
            method = raw_config["quantization_config"].get("quant_method", "unknown")
            raise Unsupported(f"quantized checkpoint ({method})")
        if raw_config.get("auto_map"):
            raise Unsupported("custom code architecture (auto_map)")
        if _is_multimodal(raw_config):
            raise Unsupported("multimodal checkpoint (its image-text-to-text class)")
        kind = detect_kind(path)
        try:
            entries: dict[str, TensorEntry] = {}
            for file in files:
                entries.update(read_header(file))
            module: Any = build_skeleton(path, kind, target_dtype)
            tokenizer = load_tokenizer(path)
        except CHECKPOINT_ERRORS as exc:
            raise _load_error(model_id, path, exc) from exc
        check_supported(module, entries, target_dtype)

        fds = {file: os.open(file, os.O_RDONLY) for file in files}
        try:
            plan = self._plan(module, entries, fds, target)
            try:
                self._reader.read(plan.pieces, plan.total_bytes, target, progress)
            except OSError as exc:
                raise LoadFailedError(
                    f"reading the weights of {model_id!r} from {path} failed: {exc}; check the files are "
                    "complete and readable (re-download if truncated)"
                ) from exc
        finally:
            for fd in fds.values():
                os.close(fd)
        for buffer_owner, name, buffer in named_buffer_slots(module):
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

        matches = match_keys(module, renamed_entries(module, entries))
        replacements: dict[int, torch.Tensor] = {}
        pieces: list[Piece] = []
        for meta, entry in matches.values():
            src_dtype = getattr(torch, torch_name_of_code(entry.dtype))
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
    from gpufleet.gpu.plan.checkpoint_files import (
        read_config,  # cached: the estimate before the load already parsed this file
    )

    try:
        return read_config(path / "config.json")
    except ModelSpecError as exc:
        raise LoadFailedError(f"{exc}; the model directory is incomplete or corrupt") from exc


def _is_multimodal(config: Mapping[str, Any]) -> bool:
    """A checkpoint with a vision (or audio) tower beside its language model."""
    return any(isinstance(config.get(key), Mapping) for key in ("vision_config", "audio_config"))


def _auto_class(path: Path, kind: ModelKind) -> Any:
    """The transformers auto class that builds the checkpoint's whole model (transformers' classes are untyped).

    Multimodal checkpoints that ``AutoModelForCausalLM`` does not map (Qwen2-VL, LLaVA ...) load with
    ``AutoModelForImageTextToText``: all their weights are read, and text generation runs through its language
    model; the ones it maps (Gemma 3, Llama 4, Mllama) keep the causal LM class.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    if kind is ModelKind.EMBEDDING:
        return AutoModel
    config = _read_config(path)
    if _is_multimodal(config):
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        )

        model_type = str(config.get("model_type", ""))
        if (
            model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        ):
            from transformers import AutoModelForImageTextToText

            return AutoModelForImageTextToText
    return AutoModelForCausalLM


def _load_generation_config(module: Any, path: Path) -> None:
    """What ``from_pretrained`` does after loading: the directory's generation_config.json, if any."""
    if not (path / "generation_config.json").is_file() or not hasattr(module, "generation_config"):
        return
    from transformers import GenerationConfig

    try:
        module.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
    except OSError as exc:
        log.warning("ignoring unreadable %s: %s", path / "generation_config.json", exc)
