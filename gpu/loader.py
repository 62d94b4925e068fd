"""Loading models from local directories onto a device (torch and transformers, imported lazily).

:class:`ModelLoader` is the interface the worker runtime uses; :class:`PretrainedLoader` is the reference
implementation (``from_pretrained``). Faster loaders implement the same protocol and fall back to this one for
what they do not handle.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

from gpu.errors import ModelLoadError
from gpu.inference import LoadedModel, ModelKind, detect_kind, detect_pooling, module_bytes


class ModelLoader(Protocol):
    """Loads a resolved model directory onto a device."""

    name: str

    def load(self, model_id: str, path: Path, *, device: str, dtype: str) -> LoadedModel:
        """Load ``path`` onto ``device`` in ``dtype`` ("float32", "float16" or "bfloat16").

        Raises:
            ModelLoadError: the weights could not be read or placed.
            DeviceOutOfMemoryError: the device ran out of memory while placing them.
        """
        ...


def torch_dtype(name: str) -> object:
    """The torch dtype for ``"float32"``, ``"float16"`` or ``"bfloat16"``."""
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


class PretrainedLoader:
    """``from_pretrained`` onto the device: the reference path every faster loader is checked against."""

    name = "from_pretrained"

    def __init__(self, *, trust_remote_code: bool = False) -> None:
        self.trust_remote_code = trust_remote_code

    def load(self, model_id: str, path: Path, *, device: str, dtype: str) -> LoadedModel:
        from gpu.oom import translate_oom

        started = time.perf_counter()
        kind = detect_kind(path)
        try:
            from transformers import AutoModel, AutoModelForCausalLM

            auto = AutoModelForCausalLM if kind is ModelKind.CAUSAL_LM else AutoModel
            with translate_oom(f"loading {model_id}"):
                module = auto.from_pretrained(
                    str(path),
                    dtype=torch_dtype(dtype),
                    device_map=device,
                    local_files_only=True,
                    trust_remote_code=self.trust_remote_code,
                )
            module.eval()
            tokenizer = load_tokenizer(path)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(
                f"could not load {model_id!r} from {path}: {exc}; check that the directory holds config.json, "
                "safetensors weights and tokenizer files"
            ) from exc
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
            load_s=time.perf_counter() - started,
            pooling=detect_pooling(path),
        )
