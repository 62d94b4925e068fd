"""Serving GGUF files: transformers' GGUF loading, dequantized to the serving dtype (torch imported lazily).

A GGUF model directory holds a ``.gguf`` file (llama.cpp's format: quantized blocks plus the config and the
tokenizer as metadata) and maybe nothing else. transformers reads it with ``from_pretrained(dir, gguf_file=...)``
and dequantizes every tensor to the requested dtype, so the model served is a plain transformers model: the
same embed and generate paths, and the same memory as an unquantized checkpoint of its size, which is what
:mod:`gpufleet.gpu.plan.gguf` plans for. Newer transformers can keep the blocks packed when the ``kernels`` package is
installed; this loader asks for dequantized weights, so what is resident always matches the plan.

The tokenizer comes from the directory when it has tokenizer files, else from the GGUF metadata.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

from gpufleet.gpu.errors import LoadFailedError
from gpufleet.gpu.runtime.model import (
    LoadedModel,
    ModelKind,
    detect_pooling,
    gguf_model_file,
    gguf_model_kind,
    module_bytes,
)

__all__ = ["load_gguf"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_gguf(
    model_id: str, path: Path, *, device: str, dtype: str, placement: dict[str, Any], trust_remote_code: bool
) -> LoadedModel:
    """Load the GGUF model in ``path`` onto ``device``, dequantized to ``dtype``.

    Args:
        model_id: the id it is served under.
        path: the model directory.
        device: a torch device string.
        dtype: the served precision.
        placement: ``from_pretrained``'s placement arguments (``device_map``); empty to load on the CPU and move.
        trust_remote_code: passed to transformers (GGUF architectures are built in: it is never needed).

    Raises:
        LoadFailedError: the ``gguf`` package is missing, the file is split, unreadable, or of an architecture
            transformers cannot load from GGUF.
        DeviceOutOfMemoryError: the device ran out of memory while placing the weights.
    """
    from gpufleet.gpu.runtime.checkpoint_io import CHECKPOINT_ERRORS, load_tokenizer, torch_dtype
    from gpufleet.gpu.runtime.oom import translate_oom

    started = time.perf_counter()
    file = gguf_model_file(path)
    kind = gguf_model_kind(path)
    if importlib.util.find_spec("gguf") is None:
        raise LoadFailedError(
            f"{model_id!r} is a GGUF model ({file.name}) and transformers needs the `gguf` package to read it; "
            "install it with `pip install 'gpufleet[worker]'` (or `pip install gguf`)"
        )
    try:
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        auto: Any = AutoModelForCausalLM if kind is ModelKind.CAUSAL_LM else AutoModel
        with translate_oom(f"loading {model_id}"):
            module = auto.from_pretrained(
                str(path),
                gguf_file=file.name,
                dtype=torch_dtype(dtype),
                local_files_only=True,
                trust_remote_code=trust_remote_code,
                **_dequantized(file.name),
                **placement,
            )
            if not placement:
                module = module.to(device)
        module.eval()
        if any((path / name).is_file() for name in _TOKENIZER_FILES):
            tokenizer = load_tokenizer(path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(path), gguf_file=file.name, local_files_only=True)
            if tokenizer.pad_token is None and tokenizer.eos_token is not None:
                tokenizer.pad_token = tokenizer.eos_token
    except CHECKPOINT_ERRORS as exc:
        raise LoadFailedError(
            f"could not load the GGUF model {model_id!r} from {file}: {exc}; check that the file is complete and "
            "of an architecture transformers reads from GGUF (llama, mistral, qwen2, qwen3, phi3, gemma, gpt2 ...)"
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
        loader=f"gguf ({file.name}, dequantized to {dtype})",
        load_s=time.perf_counter() - started,
        pooling=detect_pooling(path),
        extra={"gguf_file": file.name},
    )


def _dequantized(file_name: str) -> dict[str, Any]:
    """Ask for dequantized weights where transformers could keep GGUF blocks packed (its ``GgufConfig``).

    Older transformers have no such config and always dequantize: nothing to pass then.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    config: Any = GgufConfig
    return {"quantization_config": config(gguf_file=file_name, dequantize=True)}
