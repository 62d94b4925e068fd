"""Model specs: what a model is, in the numbers that decide where it fits.

A :class:`ModelSpec` comes from a model directory, a ``config.json``, a GGUF file, or a name alone
(``meta-llama/Llama-3.1-8B-Instruct``, ``Qwen/Qwen3-30B-A3B``, ``TheBloke/Llama-2-70B-GPTQ``), which is an
estimate and says so in :attr:`ModelSpec.notes`.

Where the parameters come from, best first (the first note says which was used):

1. the checkpoint's safetensors headers, when the files are there: exact bytes and parameters, quantized
   layouts included (:mod:`gpufleet.gpu.plan.safetensors_header`);
2. a formula for the config's ``model_type`` (:mod:`gpufleet.gpu.plan.formulas`), each within 1 % of what transformers
   instantiates on the meta device;
3. for any other ``model_type``, the general path (:mod:`gpufleet.gpu.plan.general`): transformers' own meta-device
   count when it is installed, else the checkpoint's size on disk, else a refusal. Never a small guess.

:func:`gpufleet.gpu.plan.formulas.parameter_counts` makes that choice; :mod:`gpufleet.gpu.plan.checkpoint_files` reads
the directory (``config.json``, the index and the weight files).

Pure Python: never imports torch or transformers (the optional meta-device count imports them inside one
function), so the router plans known families and checkpoints with weights on a machine without them. The
name-only rules (sizes, known names, quantization suffixes, GGUF quant types) live in
:mod:`gpufleet.gpu.plan.model_names`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from gpufleet.gpu.errors import ModelSpecError
from gpufleet.gpu.plan import gguf
from gpufleet.gpu.plan.checkpoint_files import checkpoint_layout, read_config
from gpufleet.gpu.plan.counting import positive_int
from gpufleet.gpu.plan.formulas import parameter_counts
from gpufleet.gpu.plan.model_names import (
    DEFAULT_GGUF_TYPE,
    GGUF_BITS_PER_WEIGHT,
    NAME_VOCAB,
    NameSize,
    Quantization,
    QuantMethod,
    family_from_name,
    gguf_type_from_name,
    quantization_from_config,
    quantization_from_name,
    reference_shape,
    size_from_name,
)
from gpufleet.gpu.plan.model_spec import ModelSpec, SpecSource
from gpufleet.gpu.plan.safetensors_header import CheckpointWeights, weights_from_safetensors

__all__ = [
    "load_spec",
    "spec_from_config",
    "spec_from_name",
    "spec_from_path",
]

# --------------------------------------------------------------------------------------------------- records


# --------------------------------------------------------------------------------------------- entry points


def load_spec(model: ModelSpec | str | Path) -> ModelSpec:
    """A spec for a model given as a spec, a path (model directory, ``config.json`` or ``.gguf``) or a name.

    A string is a path when it exists on disk or looks like one (starts with ``/``, ``./``, ``../`` or ``~``,
    or ends in ``.json``); otherwise it is a model name.

    Raises:
        ModelSpecError: empty input, a missing path, a config that is not JSON or lacks what planning needs,
            or a name with neither a known family nor a size in it.
    """
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, Path):
        return spec_from_path(model)
    if not isinstance(model, str) or not model.strip():
        raise ModelSpecError(
            "model is empty: pass a name like 'meta-llama/Llama-3.1-8B-Instruct', a model directory or a "
            "config.json path"
        )
    text = model.strip()
    path = Path(text).expanduser()
    if path.exists():
        return spec_from_path(path)
    if text.startswith(("/", "./", "../", "~")) or text.endswith(".json") or "\\" in text:
        raise ModelSpecError(
            f"path {text!r} does not exist: pass an existing model directory, config.json or .gguf file, "
            "or a model name"
        )
    return spec_from_name(text)


def spec_from_path(path: Path) -> ModelSpec:
    """A spec from a model directory, a ``config.json`` file or a ``.gguf`` file.

    Raises:
        ModelSpecError: the path is missing, holds neither a config.json nor a .gguf file, or the config is
            not valid JSON or lacks what planning needs.
    """
    path = path.expanduser()
    if not path.exists():
        raise ModelSpecError(
            f"path {str(path)!r} does not exist: pass an existing model directory, config.json or .gguf file"
        )
    if path.is_dir():
        config = path / "config.json"
        if config.is_file():
            return _spec_from_config_file(config, model_dir=path)
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return _spec_from_gguf_files(ggufs)
        raise ModelSpecError(
            f"{path} has neither a config.json nor a .gguf file: point at the model's directory or its config"
        )
    if path.suffix.lower() == ".gguf":
        return _spec_from_gguf_files([path])
    if path.suffix.lower() == ".json":
        return _spec_from_config_file(path, model_dir=path.parent)
    raise ModelSpecError(
        f"{path} is neither a directory, a .json config nor a .gguf file: pass the model directory instead"
    )


def spec_from_config(
    config: Mapping[str, Any],
    *,
    name: str | None = None,
    num_shards: int = 1,
    checkpoint_bytes: int | None = None,
    weights: CheckpointWeights | None = None,
) -> ModelSpec:
    """A spec from a parsed ``config.json``, and the checkpoint's headers when they were read.

    Args:
        config: the config as a dict (``model_type``, sizes, ``torch_dtype``/``dtype``, ``quantization_config``).
        name: the model's name for messages; defaults to the config's ``_name_or_path`` or its ``model_type``.
        num_shards: weight files in the checkpoint.
        checkpoint_bytes: size of the weights on disk when known; used when nothing better is.
        weights: what the checkpoint's safetensors headers say; when given, parameters and weight bytes are
            exact and the formula only supplies the geometry.

    Raises:
        ModelSpecError: the parameters cannot be counted (a formula's size is missing and no headers stand in;
            a model type without a formula, no weights, no transformers), or the quantization config is malformed.
    """
    if not isinstance(config, Mapping):
        raise ModelSpecError(f"a config must be a JSON object, got {type(config).__name__}")
    cfg = _text_config(config)
    model_type = str(config.get("model_type") or cfg.get("model_type") or "unknown").lower()
    label = name or str(config.get("_name_or_path") or model_type)
    notes: list[str] = []
    dtype = _normalize_dtype(cfg.get("dtype") or cfg.get("torch_dtype") or config.get("dtype"))
    if dtype is None and weights is not None and weights.dtype is not None:
        dtype = weights.dtype
        notes.append(f"config names no dtype: {dtype}, the checkpoint's own")
    if dtype is None:
        dtype = "float32"
        notes.append("config names no dtype: assumed float32 checkpoint (served in 16-bit on GPUs)")
    quant_config = config.get("quantization_config") or cfg.get("quantization_config")
    quantization = quantization_from_config(quant_config, label) if quant_config else None
    if quant_config and quantization is None:
        method = quant_config.get("quant_method") if isinstance(quant_config, Mapping) else None
        notes.append(f"quantization method {method!r} not recognized: planned as unquantized (an overestimate)")

    counts, source_note = parameter_counts(
        config,
        cfg,
        model_type,
        label=label,
        weights=weights,
        checkpoint_bytes=checkpoint_bytes,
        dtype=dtype,
        quantization=quantization,
    )
    notes.insert(0, source_note)
    if counts.note:
        notes.append(counts.note)
    kv = counts.kv_layout()
    if not counts.encoder:
        notes.append(f"KV cache: {kv.describe()}")
    return ModelSpec(
        name=label,
        architecture=model_type,
        params=counts.total,
        active_params=counts.active,
        quantizable_params=counts.quantizable,
        dtype=dtype,
        quantization=quantization,
        is_moe=counts.num_experts > 0,
        num_experts=counts.num_experts,
        num_experts_per_token=counts.experts_per_token,
        num_layers=counts.layers,
        hidden_size=counts.hidden,
        mlp_width=counts.mlp_width,
        num_kv_heads=counts.kv_heads,
        head_dim=counts.head_dim,
        vocab_size=counts.vocab,
        max_position_embeddings=positive_int(
            cfg.get("max_position_embeddings") or cfg.get("n_positions") or cfg.get("max_seq_len")
        ),
        tie_word_embeddings=counts.tied,
        is_encoder=counts.encoder,
        num_shards=max(num_shards, 1),
        checkpoint_bytes=weights.tensor_bytes if weights is not None else checkpoint_bytes,
        source=SpecSource.SAFETENSORS if weights is not None else SpecSource.CONFIG,
        exact=weights is not None or not source_note.startswith("parameters: checkpoint size"),
        notes=tuple(notes),
        kv_layout=kv,
        weights=weights,
    )


# ------------------------------------------------------------------------------------------------ files


def _spec_from_config_file(config_path: Path, *, model_dir: Path) -> ModelSpec:
    config = read_config(config_path)
    layout = checkpoint_layout(model_dir)
    name = model_dir.name if config_path.name == "config.json" else config_path.stem
    weights = None
    unreadable = ""
    if layout.safetensors:
        quant_config = config.get("quantization_config")
        quant = quantization_from_config(quant_config, name) if isinstance(quant_config, Mapping) else None
        try:
            weights = weights_from_safetensors(layout.safetensors, quantized_bits=quant.bits if quant else None)
        except ModelSpecError as exc:
            # Planning goes on from the config; loading the damaged file reports it as a load error.
            unreadable = f"safetensors headers not used: {exc}"
    spec = spec_from_config(
        config, name=name, num_shards=layout.num_files, checkpoint_bytes=layout.total_bytes, weights=weights
    )
    for note in (layout.note, unreadable):
        if note:
            spec = _with_note(spec, note)
    if layout.num_files > 1:
        spec = _with_note(spec, f"checkpoint in {layout.num_files} shards")
    return spec


_GGUF_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


def _spec_from_gguf_files(files: list[Path]) -> ModelSpec:
    # A real GGUF file is planned as the worker serves it: transformers dequantizes it, so gpu.plan.gguf counts
    # its parameters from the header and sizes them at the serving dtype. Only a file without a GGUF header (a
    # name-only stand-in) keeps the name and file-size estimate below.
    if gguf.is_gguf(files[0]):
        chosen, notes = gguf.gguf_files(files[0].parent) if len(files) > 1 else (files, [])
        return gguf.spec_from_gguf_files(chosen or files, notes=tuple(notes))
    first = files[0]
    # Several files: either the parts of one split model (-00001-of-00003.gguf) or several quant types side by
    # side; in the second case plan for the first, named in the notes.
    parts = [f for f in files if _GGUF_SPLIT.search(f.name)]
    chosen = parts if len(parts) == len(files) else [first]
    size_bytes = sum(f.stat().st_size for f in chosen)
    spec = _spec_from_gguf_name(first.name, size_bytes=size_bytes)
    if len(chosen) < len(files):
        spec = _with_note(spec, f"{len(files)} GGUF files found: planned for {first.name}")
    return spec


def _spec_from_gguf_name(file_name: str, *, size_bytes: int | None) -> ModelSpec:
    gguf_type = gguf_type_from_name(file_name)
    notes: list[str] = []
    if gguf_type is None:
        gguf_type = DEFAULT_GGUF_TYPE
        notes.append(f"no GGUF quant type in the name: assumed {DEFAULT_GGUF_TYPE}, the largest common one")
    bits = GGUF_BITS_PER_WEIGHT[gguf_type]
    quant = Quantization(QuantMethod.GGUF, bits=bits, gguf_type=gguf_type)
    sized = size_from_name(file_name)
    if sized is not None:
        notes.append(f"parameters from the name ({sized.text}), {bits:g} bits per weight ({gguf_type})")
    elif size_bytes:
        params = int(size_bytes * 8 / bits)
        sized = NameSize(params, params, False, 0, 0, None, "")
        notes.append(f"parameters from the file size at {bits:g} bits per weight ({gguf_type})")
    else:
        raise ModelSpecError(
            f"GGUF name {file_name!r} has no size in it (like 7B) and no file was read: pass the .gguf file path"
        )
    spec = _spec_from_size(file_name, sized, quant, notes, source=SpecSource.GGUF)
    return replace(spec, checkpoint_bytes=size_bytes or None)


# ------------------------------------------------------------------------------------------ config helpers


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's part of a config (multimodal configs nest it under ``text_config``): its dtype,
    context and, on the general path, the geometry come from it. Formulas read the whole config."""
    text = config.get("text_config")
    has_own_sizes = any(key in config for key in ("hidden_size", "n_embd", "d_model", "dim"))
    if isinstance(text, Mapping) and not has_own_sizes:
        merged = dict(text)
        merged.setdefault("model_type", text.get("model_type") or config.get("model_type"))
        merged.setdefault("torch_dtype", config.get("torch_dtype") or config.get("dtype"))
        return merged
    return config


_DTYPE_ALIASES: Mapping[str, str] = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}


def _normalize_dtype(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    return _DTYPE_ALIASES.get(value.lower().removeprefix("torch."))


# ------------------------------------------------------------------------------------------------- names


def spec_from_name(name: str) -> ModelSpec:
    """An estimated spec from a model name alone.

    Sizes come from the name (``0.5B``, ``8B``, ``405B``, ``135M``; ``8x7B`` for Mixtral-style MoE; ``30B-A3B``
    for total and active), or from a table of well-known names without one (``gpt2``, ``bert-base-uncased``,
    ``phi-2``). Quantization comes from suffixes (``-GPTQ``, ``-AWQ``, ``-FP8``, ``bnb-4bit``, ``.Q4_K_M.gguf``).
    The KV cache shape is that of a typical model of the size.

    Raises:
        ModelSpecError: the name is empty, or has neither a size nor a known family in it.
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelSpecError("model name is empty: pass a name like 'meta-llama/Llama-3.1-8B-Instruct'")
    name = name.strip()
    quant = quantization_from_name(name)
    if quant is not None and quant.method is QuantMethod.GGUF and name.lower().endswith(".gguf"):
        return _spec_from_gguf_name(name, size_bytes=None)
    sized = size_from_name(name)
    if sized is None:
        raise ModelSpecError(
            f"cannot size model {name!r} from its name: it has no size (like '7B', '0.5B', '8x7B') and is not a "
            "well-known model; pass the model's directory or config.json instead"
        )
    notes = [f"estimated from the name ({sized.text}): nominal size, typical shape; pass a config for exact"]
    if quant is not None and quant.method is QuantMethod.GGUF and gguf_type_from_name(name) is None:
        notes.append(f"no GGUF quant type in the name: assumed {DEFAULT_GGUF_TYPE}, the largest common one")
    return _spec_from_size(name, sized, quant, notes, source=SpecSource.NAME)


def _spec_from_size(
    name: str,
    sized: NameSize,
    quant: Quantization | None,
    notes: list[str],
    *,
    source: SpecSource,
) -> ModelSpec:
    shape = reference_shape(sized.per_expert_params / 1e9, encoder=sized.encoder)
    vocab = 30_522 if sized.encoder else NAME_VOCAB
    tied = sized.encoder or sized.params < 4e9
    # Embeddings (and lm_head unless tied) stay unquantized; cap them so tiny models keep some quantizable part.
    embeddings = min(vocab * shape.hidden * (1 if tied else 2), sized.params // 2)
    dtype = "float32" if sized.encoder or sized.architecture in ("gpt2", "bert") else "bfloat16"
    if re.search(r"(?<![a-z0-9])(fp16|f16|float16)(?![a-z0-9])", name.lower()):
        dtype = "float16"
    return ModelSpec(
        name=name,
        architecture=sized.architecture or family_from_name(name),
        params=sized.params,
        active_params=sized.active,
        quantizable_params=sized.params - embeddings,
        dtype=dtype,
        quantization=quant,
        is_moe=sized.is_moe,
        num_experts=sized.num_experts,
        num_experts_per_token=sized.experts_per_token,
        num_layers=shape.layers,
        hidden_size=shape.hidden,
        mlp_width=shape.hidden * 4,
        num_kv_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        vocab_size=vocab,
        max_position_embeddings=512 if sized.encoder else None,
        tie_word_embeddings=tied,
        is_encoder=sized.encoder,
        num_shards=1,
        checkpoint_bytes=None,
        source=source,
        exact=False,
        notes=tuple(notes),
    )


# ------------------------------------------------------------------------------------------------- utils


def _with_note(spec: ModelSpec, note: str) -> ModelSpec:
    return replace(spec, notes=(*spec.notes, note))
