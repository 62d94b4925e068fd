"""The records of the runtime: what a loaded model is, what it is served for, and what a generation returns.

A :class:`LoadedModel` is what every loader returns and what the model cache holds: the torch module, its
tokenizer and what the job bodies need to know about it. Record types live here, apart from the code that uses
them, so the loaders, the engines and inference import this module and not each other. Importable without torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpufleet.gpu.errors import LoadFailedError, ModelSpecError
from gpufleet.gpu.outcomes import FinishReason
from gpufleet.gpu.plan.checkpoint_files import read_config
from gpufleet.gpu.plan.gguf import GGUF_ENCODER_ARCHITECTURES, gguf_files, read_gguf_header

if TYPE_CHECKING:
    import torch


class ModelKind(str, Enum):
    """What a model is served for."""

    EMBEDDING = "embedding"
    CAUSAL_LM = "causal-lm"


class Pooling(str, Enum):
    """How token states become one sentence embedding (sentence-transformers' 1_Pooling/config.json)."""

    MEAN = "mean"
    CLS = "cls"
    LAST = "last"


@dataclass
class LoadedModel:
    """A model resident on a device, ready to answer."""

    model_id: str
    path: Path
    kind: ModelKind
    module: Any  # torch.nn.Module; Any keeps this module importable without torch
    tokenizer: Any  # a transformers PreTrainedTokenizerBase
    device: str
    dtype: str
    bytes: int  # parameters + buffers on the device
    loader: str  # which load path produced it ("fast-safetensors", "from_pretrained", ...)
    load_s: float = 0.0
    pooling: Pooling = Pooling.MEAN
    extra: dict[str, Any] = field(default_factory=dict)


CAUSAL_LM_ARCH_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def detect_kind(model_dir: Path) -> ModelKind:
    """Whether a model directory holds a causal LM or an encoder to embed with (from its config.json).

    Multimodal checkpoints (``...ForConditionalGeneration``) are causal LMs: their text generation is served.
    A GGUF model without a config.json is judged from the file's architecture.
    """
    if not (model_dir / "config.json").is_file() and is_gguf_model(model_dir):
        return gguf_model_kind(model_dir)
    try:
        config = read_config(model_dir / "config.json")
    except ModelSpecError as exc:
        raise LoadFailedError(f"{exc}; the model directory is incomplete or corrupt") from exc
    architectures = config.get("architectures") or []
    if any(str(arch).endswith(CAUSAL_LM_ARCH_SUFFIXES) for arch in architectures):
        return ModelKind.CAUSAL_LM
    return ModelKind.EMBEDDING


def detect_pooling(model_dir: Path) -> Pooling:
    """Pooling mode from sentence-transformers' ``1_Pooling/config.json``; mean pooling when absent."""
    pooling_config = model_dir / "1_Pooling" / "config.json"
    if pooling_config.is_file():
        data = json.loads(pooling_config.read_text())
        if data.get("pooling_mode_cls_token"):
            return Pooling.CLS
        if data.get("pooling_mode_lasttoken"):
            return Pooling.LAST
    return Pooling.MEAN


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        key = tensor.data_ptr()
        if key in seen and key != 0:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


@dataclass(frozen=True)
class Generation:
    """Output of :func:`generate`."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


def is_gguf_model(path: Path) -> bool:
    """Whether ``path`` is served from a GGUF file: it has one and no ``config.json`` with weights beside it.

    A directory with both a transformers checkpoint and a GGUF file is served from the checkpoint.
    """
    if not gguf_files(path)[0]:
        return False
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
    return not ((path / "config.json").is_file() and has_weights)


def gguf_model_file(path: Path) -> Path:
    """The one GGUF file the model in ``path`` is served from.

    Raises:
        LoadFailedError: no GGUF file, or a split model (transformers reads one file).
    """
    files, _ = gguf_files(path)
    if not files:
        raise LoadFailedError(f"{path} holds no .gguf model file; put the model's .gguf file in the directory")
    if len(files) > 1:
        raise LoadFailedError(
            f"{path} holds a GGUF model split in {len(files)} parts ({files[0].name} ...), and transformers loads "
            "one file: merge the parts with llama.cpp's `llama-gguf-split --merge` and keep only the merged file"
        )
    return files[0]


def gguf_model_kind(path: Path) -> ModelKind:
    """Embedding model for encoder architectures (``bert``, ``nomic-bert`` …), else causal LM.

    Raises:
        LoadFailedError: the GGUF header cannot be read.
    """
    try:
        header = read_gguf_header(gguf_model_file(path))
    except ModelSpecError as exc:
        raise LoadFailedError(f"{exc}; the model directory is incomplete or corrupt") from exc
    return ModelKind.EMBEDDING if header.architecture in GGUF_ENCODER_ARCHITECTURES else ModelKind.CAUSAL_LM
