"""Model specs: what a model is, in the numbers that decide where it fits.

A :class:`ModelSpec` comes from a ``config.json`` (exact: parameters are counted from the architecture, within
1 % of what transformers instantiates for the supported families), from a GGUF file, or from a name alone
(``meta-llama/Llama-3.1-8B-Instruct``, ``Qwen/Qwen3-30B-A3B``, ``TheBloke/Llama-2-70B-GPTQ``), which is an
estimate and says so in :attr:`ModelSpec.notes`.

Pure Python: never imports torch or transformers, so the router can plan on a machine without them. The
parameter formulas are one function per family below, each checked by a test against what transformers
instantiates on the meta device.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from gpu.errors import ModelSpecError

# --------------------------------------------------------------------------------------------------- records


class QuantMethod(str, Enum):
    """How a checkpoint's weights are quantized."""

    GPTQ = "gptq"
    AWQ = "awq"
    BNB_4BIT = "bnb-4bit"
    BNB_8BIT = "bnb-8bit"
    FP8 = "fp8"
    COMPRESSED_TENSORS = "compressed-tensors"
    MXFP4 = "mxfp4"
    GGUF = "gguf"
    OTHER = "other"


# The quantization names serving engines (vLLM's ``--quantization``) use for each method.
ENGINE_QUANTIZATION_NAMES: Mapping[QuantMethod, str] = {
    QuantMethod.GPTQ: "gptq",
    QuantMethod.AWQ: "awq",
    QuantMethod.BNB_4BIT: "bitsandbytes",
    QuantMethod.BNB_8BIT: "bitsandbytes",
    QuantMethod.FP8: "fp8",
    QuantMethod.COMPRESSED_TENSORS: "compressed-tensors",
    QuantMethod.MXFP4: "mxfp4",
    QuantMethod.GGUF: "gguf",
}

# Average bits per weight of llama.cpp quant types over a whole model (mixed tensor types included), as the
# llama.cpp quantize tool reports them for Llama-class models.
GGUF_BITS_PER_WEIGHT: Mapping[str, float] = {
    "F32": 32.0,
    "F16": 16.0,
    "BF16": 16.0,
    "Q8_0": 8.5,
    "Q6_K": 6.56,
    "Q5_K_M": 5.69,
    "Q5_K_S": 5.54,
    "Q5_1": 6.0,
    "Q5_0": 5.5,
    "Q4_K_M": 4.89,
    "Q4_K_S": 4.58,
    "Q4_1": 5.0,
    "Q4_0": 4.55,
    "IQ4_NL": 4.5,
    "IQ4_XS": 4.25,
    "Q3_K_L": 4.27,
    "Q3_K_M": 3.91,
    "Q3_K_S": 3.5,
    "IQ3_M": 3.66,
    "IQ3_S": 3.44,
    "IQ3_XS": 3.3,
    "IQ3_XXS": 3.06,
    "Q2_K": 2.96,
    "IQ2_M": 2.7,
    "IQ2_S": 2.5,
    "IQ2_XS": 2.31,
    "IQ2_XXS": 2.06,
    "IQ1_M": 1.75,
    "IQ1_S": 1.56,
}
# A GGUF repository name without a quant type holds several; plan for the largest common one.
DEFAULT_GGUF_TYPE = "Q8_0"


@dataclass(frozen=True)
class Quantization:
    """How the quantized layers (the linear layers inside the blocks) store their weights.

    Attributes:
        method: the quantization scheme.
        bits: bits per quantized weight (for GGUF: the average over the whole model).
        group_size: weights sharing one scale (and zero point); ``None`` for per-channel or per-tensor scales.
        scale_bytes: bytes per stored scale (fp16 for GPTQ/AWQ, fp32 for bitsandbytes and FP8).
        has_zero_point: a zero point is stored per group next to the scale (packed at ``bits``).
        fp8_weights: the weights are FP8, which needs FP8 tensor cores (compute capability 8.9 or later).
        gguf_type: the llama.cpp quant type (``Q4_K_M``) for GGUF files.
    """

    method: QuantMethod
    bits: float
    group_size: int | None = None
    scale_bytes: int = 2
    has_zero_point: bool = False
    fp8_weights: bool = False
    gguf_type: str | None = None

    @property
    def label(self) -> str:
        """Short human and JSON label: ``gptq-4bit``, ``awq-4bit``, ``bnb-4bit``, ``fp8``, ``gguf-Q4_K_M``."""
        if self.method is QuantMethod.GGUF:
            return f"gguf-{self.gguf_type or DEFAULT_GGUF_TYPE}"
        if self.method in (QuantMethod.GPTQ, QuantMethod.AWQ, QuantMethod.OTHER):
            return f"{self.method.value}-{self.bits:g}bit"
        if self.method is QuantMethod.COMPRESSED_TENSORS:
            kind = "fp" if self.fp8_weights else "w"
            return f"compressed-tensors-{kind}{self.bits:g}"
        return str(self.method.value)

    @property
    def engine_name(self) -> str | None:
        """The engine's name for this method (vLLM ``--quantization``), ``None`` when it has none."""
        return ENGINE_QUANTIZATION_NAMES.get(self.method)

    def bytes_per_weight(self, row_length: int) -> float:
        """Bytes one quantized weight costs, scales and zero points included.

        Args:
            row_length: input features of a typical layer (the hidden size), over which per-channel scales are
                spread when there are no groups.
        """
        group = self.group_size if self.group_size else max(row_length, 1)
        zero_bytes = self.bits / 8 if self.has_zero_point else 0.0
        return self.bits / 8 + (self.scale_bytes + zero_bytes) / group


class SpecSource(str, Enum):
    """Where a spec's numbers came from."""

    CONFIG = "config"  # counted from config.json: exact for supported families
    GGUF = "gguf"  # a GGUF file: size from the file, parameters from its name or size
    NAME = "name"  # a name alone: nominal sizes and typical shapes


@dataclass(frozen=True)
class ModelSpec:
    """A model, in the numbers planning needs.

    Attributes:
        name: the model id, path or file name it was built from.
        architecture: the config's ``model_type`` (``llama``), a family guessed from the name, or ``unknown``.
        params: total parameters (tied embeddings counted once).
        active_params: parameters used per token (less than ``params`` for MoE).
        quantizable_params: weights of the linear layers inside the blocks, which quantizers convert;
            embeddings, ``lm_head``, norms, biases and MoE routers stay in 16-bit.
        dtype: checkpoint dtype of the unquantized tensors (``bfloat16``, ``float16``, ``float32``).
        quantization: ``None`` for an unquantized checkpoint.
        is_moe: a mixture of experts.
        num_experts: experts per MoE layer (0 for dense or when unknown).
        num_experts_per_token: experts routed per token (0 for dense or when unknown).
        num_layers: transformer blocks.
        hidden_size: model width.
        mlp_width: MLP width a token goes through per layer (for MoE: active experts times expert width).
        num_kv_heads: key/value heads per layer (what the KV cache stores).
        head_dim: width of one attention head.
        vocab_size: vocabulary size.
        max_position_embeddings: longest context the model was trained for, when known.
        tie_word_embeddings: ``lm_head`` shares the input embedding.
        is_encoder: an encoder (BERT and relatives): no KV cache, no generation.
        num_shards: weight files in the checkpoint.
        checkpoint_bytes: size of the weights on disk, when known (index ``total_size`` or file sizes).
        source: where the numbers came from.
        exact: parameters were counted from a known architecture (not a name, nor a generic formula).
        notes: why-strings for a person reading a plan (estimates, assumptions).
    """

    name: str
    architecture: str
    params: int
    active_params: int
    quantizable_params: int
    dtype: str
    quantization: Quantization | None
    is_moe: bool
    num_experts: int
    num_experts_per_token: int
    num_layers: int
    hidden_size: int
    mlp_width: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int | None
    tie_word_embeddings: bool
    is_encoder: bool
    num_shards: int
    checkpoint_bytes: int | None
    source: SpecSource
    exact: bool
    notes: tuple[str, ...] = field(default=())


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
) -> ModelSpec:
    """A spec from a parsed ``config.json``.

    Args:
        config: the config as a dict (``model_type``, sizes, ``torch_dtype``/``dtype``, ``quantization_config``).
        name: the model's name for messages; defaults to the config's ``_name_or_path`` or its ``model_type``.
        num_shards: weight files in the checkpoint.
        checkpoint_bytes: size of the weights on disk when known; used when the config is not enough.

    Raises:
        ModelSpecError: the config lacks the sizes a parameter count needs and ``checkpoint_bytes`` cannot
            stand in, or its quantization config is malformed.
    """
    if not isinstance(config, Mapping):
        raise ModelSpecError(f"a config must be a JSON object, got {type(config).__name__}")
    cfg, notes = _text_config(config)
    model_type = str(cfg.get("model_type") or config.get("model_type") or "unknown").lower()
    label = name or str(config.get("_name_or_path") or model_type)
    dtype = _normalize_dtype(cfg.get("dtype") or cfg.get("torch_dtype") or config.get("dtype"))
    if dtype is None:
        dtype = "float32"
        notes.append("config names no dtype: assumed float32 checkpoint (served in 16-bit on GPUs)")
    quant_config = config.get("quantization_config") or cfg.get("quantization_config")
    quantization = _quantization_from_config(quant_config, label) if quant_config else None
    if quant_config and quantization is None:
        method = quant_config.get("quant_method") if isinstance(quant_config, Mapping) else None
        notes.append(f"quantization method {method!r} not recognized: planned as unquantized (an overestimate)")

    counter = _FAMILIES.get(model_type)
    if counter is not None:
        counts = counter(_Cfg(cfg, model_type))
        exact = True
        notes.insert(0, f"parameters counted from config.json ({model_type} architecture)")
    else:
        counts = _generic_counts(_Cfg(cfg, model_type), label, checkpoint_bytes, dtype, quantization)
        exact = False
        notes.insert(0, counts.note)
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
        max_position_embeddings=_positive_int(
            cfg.get("max_position_embeddings") or cfg.get("n_positions") or cfg.get("max_seq_len")
        ),
        tie_word_embeddings=counts.tied,
        is_encoder=counts.encoder,
        num_shards=max(num_shards, 1),
        checkpoint_bytes=checkpoint_bytes,
        source=SpecSource.CONFIG,
        exact=exact,
        notes=tuple(notes),
    )


# ------------------------------------------------------------------------------------------------ files


def _spec_from_config_file(config_path: Path, *, model_dir: Path) -> ModelSpec:
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelSpecError(
            f"cannot read {config_path}: {exc.strerror or exc}; check the path and permissions"
        ) from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelSpecError(
            f"{config_path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}): "
            "re-download or fix the config"
        ) from None
    if not isinstance(config, dict):
        raise ModelSpecError(f"{config_path} holds a JSON {type(config).__name__}, not an object: fix the config")
    num_shards, checkpoint_bytes = _checkpoint_layout(model_dir)
    name = model_dir.name if config_path.name == "config.json" else config_path.stem
    spec = spec_from_config(config, name=name, num_shards=num_shards, checkpoint_bytes=checkpoint_bytes)
    if num_shards > 1:
        spec = _with_note(spec, f"checkpoint in {num_shards} shards")
    return spec


def _checkpoint_layout(model_dir: Path) -> tuple[int, int | None]:
    """(number of weight files, bytes on disk) from an index file or the weight files themselves."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = model_dir / index_name
        if not index_path.is_file():
            continue
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelSpecError(
                f"{index_path} is not a readable JSON index ({exc}): re-download the model's index file"
            ) from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        shards = len(set(weight_map.values())) if isinstance(weight_map, dict) else 1
        metadata = index.get("metadata") if isinstance(index, dict) else None
        total = _positive_int(metadata.get("total_size")) if isinstance(metadata, dict) else None
        return max(shards, 1), total
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        return 1, None
    return len(files), sum(f.stat().st_size for f in files)


_GGUF_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


def _spec_from_gguf_files(files: list[Path]) -> ModelSpec:
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
    gguf_type = _gguf_type(file_name)
    notes: list[str] = []
    if gguf_type is None:
        gguf_type = DEFAULT_GGUF_TYPE
        notes.append(f"no GGUF quant type in the name: assumed {DEFAULT_GGUF_TYPE}, the largest common one")
    bits = GGUF_BITS_PER_WEIGHT[gguf_type]
    quant = Quantization(QuantMethod.GGUF, bits=bits, gguf_type=gguf_type)
    sized = _size_from_name(file_name)
    if sized is not None:
        notes.append(f"parameters from the name ({sized.text}), {bits:g} bits per weight ({gguf_type})")
    elif size_bytes:
        params = int(size_bytes * 8 / bits)
        sized = _NameSize(params, params, False, 0, 0, None, "")
        notes.append(f"parameters from the file size at {bits:g} bits per weight ({gguf_type})")
    else:
        raise ModelSpecError(
            f"GGUF name {file_name!r} has no size in it (like 7B) and no file was read: pass the .gguf file path"
        )
    spec = _spec_from_size(file_name, sized, quant, notes, source=SpecSource.GGUF)
    return replace(spec, checkpoint_bytes=size_bytes or None)


def _gguf_type(name: str) -> str | None:
    upper = name.upper()
    # Longest names first so Q4_K_M wins over Q4_K and IQ4_XS over Q4.
    for gguf_type in sorted(GGUF_BITS_PER_WEIGHT, key=len, reverse=True):
        if re.search(rf"(?<![A-Z0-9]){re.escape(gguf_type)}(?![A-Z0-9])", upper):
            return gguf_type
    return None


# ------------------------------------------------------------------------------------------ config helpers


def _text_config(config: Mapping[str, Any]) -> tuple[Mapping[str, Any], list[str]]:
    """The language model's part of a config: multimodal configs nest it under ``text_config``."""
    notes: list[str] = []
    text = config.get("text_config")
    has_own_sizes = any(key in config for key in ("hidden_size", "n_embd", "d_model", "dim"))
    if isinstance(text, Mapping) and not has_own_sizes:
        notes.append("multimodal config: counted the text model only (vision/audio towers are not included)")
        merged = dict(text)
        merged.setdefault("model_type", text.get("model_type") or config.get("model_type"))
        merged.setdefault("torch_dtype", config.get("torch_dtype") or config.get("dtype"))
        return merged, notes
    return config, notes


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


def _positive_int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value) if value > 0 else None


class _Cfg:
    """Typed reads from a config dict, with the attribute aliases transformers uses (``n_embd`` …)."""

    def __init__(self, raw: Mapping[str, Any], model_type: str) -> None:
        self.raw = raw
        self.model_type = model_type

    def req(self, *keys: str, default: int | None = None) -> int:
        for key in keys:
            value = _positive_int(self.raw.get(key))
            if value is not None:
                return value
        if default is None:
            raise ModelSpecError(
                f"config.json ({self.model_type}) has no {' / '.join(keys)}: the parameter count needs it; "
                "check that the file is the model's config"
            )
        return default

    def opt(self, *keys: str) -> int | None:
        for key in keys:
            value = _positive_int(self.raw.get(key))
            if value is not None:
                return value
        return None

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw.get(key)
        return bool(value) if value is not None else default


@dataclass(frozen=True)
class _Counts:
    total: int
    active: int
    quantizable: int
    layers: int
    hidden: int
    mlp_width: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    num_experts: int = 0
    experts_per_token: int = 0
    encoder: bool = False
    note: str = ""


# ------------------------------------------------------------------------------------- architecture counts

# Families whose config defaults differ from the llama defaults.
_TIED_BY_DEFAULT = {"gemma", "gemma2", "gpt2", "falcon"}
_QKV_BIAS_ALWAYS = {"qwen2", "qwen2_moe"}  # q/k/v have biases regardless of config; o_proj has none
_NO_BIAS = {"mistral", "mixtral", "phi3"}
_QK_NORM = {"qwen3", "qwen3_moe"}  # RMSNorm over head_dim on q and k
_DEFAULT_HEAD_DIM = {"qwen3": 128, "qwen3_moe": 128, "gemma": 256, "gemma2": 256}


def _decoder_counts(c: _Cfg) -> _Counts:
    """Llama-style decoders: llama, mistral, mixtral, qwen2(-moe), qwen3(-moe), gemma, gemma2, phi3."""
    mt = c.model_type
    h = c.req("hidden_size")
    layers = c.req("num_hidden_layers")
    vocab = c.req("vocab_size")
    heads = c.req("num_attention_heads")
    kv_heads = c.req("num_key_value_heads", default=heads)
    head_dim = c.req("head_dim", default=_DEFAULT_HEAD_DIM.get(mt, h // heads))
    intermediate = c.req("intermediate_size")
    tied = c.flag("tie_word_embeddings", mt in _TIED_BY_DEFAULT)

    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    attn_weights = h * q_out + 2 * h * kv_out + q_out * h
    if mt in _QKV_BIAS_ALWAYS:
        attn_bias = q_out + 2 * kv_out
    elif mt in _NO_BIAS or not c.flag("attention_bias", False):
        attn_bias = 0
    else:
        attn_bias = q_out + 2 * kv_out + h
    qk_norm = 2 * head_dim if mt in _QK_NORM else 0
    norms = (4 if mt == "gemma2" else 2) * h
    mlp_bias = 2 * intermediate + h if c.flag("mlp_bias", False) else 0
    dense_mlp = 3 * h * intermediate

    # MoE: mixtral names it num_local_experts, the qwen MoEs num_experts and moe_intermediate_size.
    num_experts = c.opt("num_local_experts", "num_experts") or 0
    per_token = c.opt("num_experts_per_tok") or 0
    expert_width = c.req("moe_intermediate_size", default=intermediate)
    shared_width = c.opt("shared_expert_intermediate_size") if mt == "qwen2_moe" else None
    sparse_step = c.req("decoder_sparse_step", default=1)
    mlp_only = set(c.raw.get("mlp_only_layers") or [])

    total = active = quantizable = 0
    for layer in range(layers):
        block = attn_weights + attn_bias + qk_norm + norms
        block_quantizable = attn_weights
        sparse = num_experts > 0 and layer not in mlp_only and (layer + 1) % sparse_step == 0
        if sparse:
            experts = num_experts * 3 * h * expert_width
            router = h * num_experts
            shared = 3 * h * shared_width + h if shared_width else 0
            total += block + experts + router + shared
            active += block + per_token * 3 * h * expert_width + router + shared
            quantizable += block_quantizable + experts + (3 * h * shared_width if shared_width else 0)
        else:
            total += block + dense_mlp + mlp_bias
            active += block + dense_mlp + mlp_bias
            quantizable += block_quantizable + dense_mlp
    embeddings = vocab * h * (1 if tied else 2) + h  # input embedding, lm_head unless tied, final norm
    mlp_width = per_token * expert_width + (shared_width or 0) if num_experts else intermediate
    return _Counts(
        total=total + embeddings,
        active=active + embeddings,
        quantizable=quantizable,
        layers=layers,
        hidden=h,
        mlp_width=mlp_width,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=vocab,
        tied=tied,
        num_experts=num_experts,
        experts_per_token=per_token if num_experts else 0,
    )


def _gpt2_counts(c: _Cfg) -> _Counts:
    h = c.req("n_embd", "hidden_size")
    layers = c.req("n_layer", "num_hidden_layers")
    heads = c.req("n_head", "num_attention_heads")
    vocab = c.req("vocab_size")
    positions = c.req("n_positions", "max_position_embeddings", default=1024)
    inner = c.req("n_inner", default=4 * h)
    matrices = 4 * h * h + 2 * h * inner
    per_layer = matrices + 3 * h + h + inner + h + 4 * h  # biases, then two LayerNorms (weight + bias)
    total = vocab * h + positions * h + layers * per_layer + 2 * h
    return _Counts(total, total, layers * matrices, layers, h, inner, heads, h // heads, vocab, tied=True)


def _gpt_neox_counts(c: _Cfg) -> _Counts:
    h = c.req("hidden_size")
    layers = c.req("num_hidden_layers")
    heads = c.req("num_attention_heads")
    vocab = c.req("vocab_size")
    inner = c.req("intermediate_size", default=4 * h)
    tied = c.flag("tie_word_embeddings", False)
    attn_bias = 4 * h if c.flag("attention_bias", True) else 0
    matrices = 4 * h * h + 2 * h * inner
    per_layer = matrices + attn_bias + inner + h + 4 * h
    total = vocab * h * (1 if tied else 2) + layers * per_layer + 2 * h
    return _Counts(total, total, layers * matrices, layers, h, inner, heads, h // heads, vocab, tied)


def _falcon_counts(c: _Cfg) -> _Counts:
    h = c.req("hidden_size", "n_embd")
    layers = c.req("num_hidden_layers", "n_layer")
    heads = c.req("num_attention_heads", "n_head")
    vocab = c.req("vocab_size")
    head_dim = h // heads
    new_arch = c.flag("new_decoder_architecture", False)
    multi_query = c.flag("multi_query", True)
    parallel = c.flag("parallel_attn", True)
    bias = c.flag("bias", False)
    kv_heads = c.req("num_kv_heads", default=heads)
    ffn = c.req("ffn_hidden_size", default=4 * h)
    tied = c.flag("tie_word_embeddings", True)
    if new_arch:
        qkv_out = (2 * kv_heads + heads) * head_dim
    elif multi_query:
        qkv_out, kv_heads = h + 2 * head_dim, 1
    else:
        qkv_out = 3 * h
    matrices = h * qkv_out + h * h + 2 * h * ffn
    biases = qkv_out + h + ffn + h if bias else 0
    num_ln = c.opt("num_ln_in_parallel_attn") or (2 if new_arch else 1)
    layer_norms = 2 if (not parallel or num_ln == 2) else 1
    per_layer = matrices + biases + layer_norms * 2 * h
    total = vocab * h * (1 if tied else 2) + layers * per_layer + 2 * h
    return _Counts(total, total, layers * matrices, layers, h, ffn, kv_heads, head_dim, vocab, tied)


def _bert_counts(c: _Cfg) -> _Counts:
    """BERT, RoBERTa, XLM-RoBERTa, CamemBERT (AutoModel: with the pooler)."""
    h = c.req("hidden_size")
    layers = c.req("num_hidden_layers")
    heads = c.req("num_attention_heads")
    vocab = c.req("vocab_size")
    positions = c.req("max_position_embeddings", default=512)
    type_vocab = c.req("type_vocab_size", default=2)
    inner = c.req("intermediate_size", default=4 * h)
    matrices = 4 * h * h + 2 * h * inner
    per_layer = matrices + 4 * h + inner + h + 2 * 2 * h
    embeddings = (vocab + positions + type_vocab) * h + 2 * h
    total = embeddings + layers * per_layer + h * h + h  # pooler dense
    return _Counts(total, total, layers * matrices, layers, h, inner, heads, h // heads, vocab, True, encoder=True)


def _distilbert_counts(c: _Cfg) -> _Counts:
    h = c.req("dim", "hidden_size")
    layers = c.req("n_layers", "num_hidden_layers")
    heads = c.req("n_heads", "num_attention_heads")
    vocab = c.req("vocab_size")
    positions = c.req("max_position_embeddings", default=512)
    inner = c.req("hidden_dim", "intermediate_size", default=4 * h)
    matrices = 4 * h * h + 2 * h * inner
    per_layer = matrices + 4 * h + inner + h + 2 * 2 * h
    total = (vocab + positions) * h + 2 * h + layers * per_layer
    return _Counts(total, total, layers * matrices, layers, h, inner, heads, h // heads, vocab, True, encoder=True)


_FAMILIES: Mapping[str, Callable[[_Cfg], _Counts]] = {
    **dict.fromkeys(
        ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "phi3"),
        _decoder_counts,
    ),
    "gpt2": _gpt2_counts,
    "gpt_neox": _gpt_neox_counts,
    "falcon": _falcon_counts,
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert"), _bert_counts),
    "distilbert": _distilbert_counts,
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(sorted(_FAMILIES))
"""``model_type`` values counted exactly; any other falls back to a generic estimate."""


def _generic_counts(
    c: _Cfg,
    label: str,
    checkpoint_bytes: int | None,
    dtype: str,
    quantization: Quantization | None,
) -> _Counts:
    """A llama-shaped estimate for an architecture we have no formula for; the bytes on disk when no sizes."""
    h = c.opt("hidden_size", "n_embd", "d_model", "dim")
    layers = c.opt("num_hidden_layers", "n_layer", "num_layers", "n_layers")
    vocab = c.opt("vocab_size") or 32_000
    if h and layers:
        heads = c.opt("num_attention_heads", "n_head", "num_heads", "n_heads") or max(h // 128, 1)
        kv_heads = c.opt("num_key_value_heads", "num_kv_heads", "n_kv_heads") or heads
        head_dim = c.opt("head_dim") or h // heads
        inter = c.opt("intermediate_size", "ffn_hidden_size", "n_inner")
        mlp = 3 * h * inter if inter else 8 * h * h  # gated when a width is given, else a 4h GELU MLP
        experts = c.opt("num_local_experts", "num_experts", "n_routed_experts") or 0
        per_token = c.opt("num_experts_per_tok") or 0
        expert_width = c.opt("moe_intermediate_size") or inter or 4 * h
        attn = 2 * h * heads * head_dim + 2 * h * kv_heads * head_dim
        if experts:
            expert_mlp = 3 * h * expert_width
            per_layer = attn + experts * expert_mlp + h * experts
            active_layer = attn + max(per_token, 1) * expert_mlp + h * experts
        else:
            per_layer = active_layer = attn + mlp
        tied = c.flag("tie_word_embeddings", False)
        embeddings = vocab * h * (1 if tied else 2)
        total = layers * per_layer + embeddings
        return _Counts(
            total=total,
            active=layers * active_layer + embeddings,
            quantizable=layers * (per_layer - (h * experts if experts else 0)),
            layers=layers,
            hidden=h,
            mlp_width=(per_token * expert_width) if experts else (inter or 4 * h),
            kv_heads=kv_heads,
            head_dim=head_dim,
            vocab=vocab,
            tied=tied,
            num_experts=experts,
            experts_per_token=per_token,
            note=(
                f"unknown architecture {c.model_type!r}: generic llama-shaped estimate from hidden_size and "
                "num_hidden_layers (expect a few percent error)"
            ),
        )
    if checkpoint_bytes:
        bytes_per_param = _DTYPE_BYTES.get(dtype, 2.0) if quantization is None else quantization.bits / 8
        params = int(checkpoint_bytes / bytes_per_param)
        shape = _reference_shape(params / 1e9)
        return _Counts(
            total=params,
            active=params,
            quantizable=int(params * 0.9),
            layers=shape.layers,
            hidden=shape.hidden,
            mlp_width=shape.hidden * 4,
            kv_heads=shape.kv_heads,
            head_dim=shape.head_dim,
            vocab=vocab,
            tied=False,
            note=(
                f"unknown architecture {c.model_type!r} without sizes: parameters from the checkpoint size on "
                "disk, KV cache from a typical shape"
            ),
        )
    sized = _size_from_name(label)
    if sized is not None:
        shape = _reference_shape(sized.per_expert_params / 1e9)
        return _Counts(
            total=sized.params,
            active=sized.active,
            quantizable=int(sized.params * 0.9),
            layers=shape.layers,
            hidden=shape.hidden,
            mlp_width=shape.hidden * 4,
            kv_heads=shape.kv_heads,
            head_dim=shape.head_dim,
            vocab=vocab,
            tied=False,
            num_experts=sized.num_experts,
            experts_per_token=sized.experts_per_token,
            note=f"unknown architecture {c.model_type!r} without sizes: parameters from the name ({sized.text})",
        )
    raise ModelSpecError(
        f"config for {label!r} has unknown architecture {c.model_type!r} and no hidden_size/num_hidden_layers, "
        f"no weights on disk and no size in its name: add the weights or the sizes, or plan by a name with a "
        f"size (like '7B'); known architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


_DTYPE_BYTES: Mapping[str, float] = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0}


# ----------------------------------------------------------------------------------------- quantization


def _quantization_from_config(qc: object, label: str) -> Quantization | None:
    if not isinstance(qc, Mapping):
        raise ModelSpecError(f"{label}: quantization_config must be a JSON object; fix the config")
    method = str(qc.get("quant_method") or "").lower().replace("_", "-")
    group = _group(qc.get("group_size", qc.get("q_group_size", 128)))
    if method == "gptq":
        return Quantization(QuantMethod.GPTQ, float(qc.get("bits", 4)), group, 2, has_zero_point=True)
    if method == "awq":
        bits = float(qc.get("bits", qc.get("w_bit", 4)))
        return Quantization(QuantMethod.AWQ, bits, group, 2, has_zero_point=bool(qc.get("zero_point", True)))
    if method == "bitsandbytes":
        if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
            # Absmax per block of 64 weights: fp32, or 8-bit with double quantization.
            scale_bytes = 1 if qc.get("bnb_4bit_use_double_quant") else 4
            return Quantization(QuantMethod.BNB_4BIT, 4.0, 64, scale_bytes)
        if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
            return Quantization(QuantMethod.BNB_8BIT, 8.0, None, 4)
        raise ModelSpecError(f"{label}: bitsandbytes quantization_config sets neither load_in_4bit nor load_in_8bit")
    if method in ("fp8", "fbgemm-fp8", "finegrained-fp8"):
        return Quantization(QuantMethod.FP8, 8.0, None, 4, fp8_weights=True)
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    if method == "mxfp4":
        return Quantization(QuantMethod.MXFP4, 4.0, 32, 1)
    other_bits = qc.get("bits") or qc.get("weight_bits")
    if isinstance(other_bits, (int, float)) and other_bits > 0:
        return Quantization(QuantMethod.OTHER, float(other_bits), group, 2, has_zero_point=True)
    return None


def _group(value: object) -> int | None:
    return int(value) if isinstance(value, (int, float)) and value > 0 else None


def _compressed_tensors(qc: Mapping[str, Any]) -> Quantization:
    groups = qc.get("config_groups")
    weights: Mapping[str, Any] = {}
    if isinstance(groups, Mapping):
        for group in groups.values():
            if isinstance(group, Mapping) and isinstance(group.get("weights"), Mapping):
                weights = group["weights"]
                break
    bits = float(weights.get("num_bits", 8))
    is_float = str(weights.get("type", "int")).lower() == "float"
    strategy = str(weights.get("strategy", "channel")).lower()
    group = _group(weights.get("group_size")) if strategy == "group" else None
    return Quantization(
        QuantMethod.COMPRESSED_TENSORS,
        bits,
        group,
        scale_bytes=2,
        has_zero_point=not bool(weights.get("symmetric", True)),
        fp8_weights=is_float and bits == 8,
    )


# ------------------------------------------------------------------------------------------------- names


@dataclass(frozen=True)
class _NameSize:
    params: int
    active: int
    is_moe: bool
    num_experts: int
    experts_per_token: int
    per_expert: int | None  # the dense base of an NxM name, which sets the KV shape
    text: str
    architecture: str = ""
    encoder: bool = False

    @property
    def per_expert_params(self) -> int:
        return self.per_expert or self.params


@dataclass(frozen=True)
class _Shape:
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int


# Typical shapes by size (billions of parameters), from the Llama 3 / Qwen 2.5 / SmolLM families: the KV cache of
# a name-only model is estimated from the nearest.
_REFERENCE_SHAPES: tuple[tuple[float, _Shape], ...] = (
    (0.135, _Shape(30, 576, 3, 64)),
    (0.5, _Shape(24, 896, 2, 64)),
    (1.0, _Shape(16, 2048, 8, 64)),
    (1.5, _Shape(28, 1536, 2, 128)),
    (3.0, _Shape(28, 3072, 8, 128)),
    (8.0, _Shape(32, 4096, 8, 128)),
    (14.0, _Shape(48, 5120, 8, 128)),
    (32.0, _Shape(64, 5120, 8, 128)),
    (70.0, _Shape(80, 8192, 8, 128)),
    (405.0, _Shape(126, 16384, 8, 128)),
)
_ENCODER_SHAPES: tuple[tuple[float, _Shape], ...] = (
    (0.03, _Shape(6, 384, 12, 32)),
    (0.11, _Shape(12, 768, 12, 64)),
    (0.34, _Shape(24, 1024, 16, 64)),
)
_NAME_VOCAB = 152_064  # a large modern vocabulary (Qwen 2.5): keeps the unquantized embedding estimate honest


def _reference_shape(params_b: float, *, encoder: bool = False) -> _Shape:
    table = _ENCODER_SHAPES if encoder else _REFERENCE_SHAPES
    return min(table, key=lambda entry: abs(math.log(max(params_b, 1e-3) / entry[0])))[1]


# Well-known names without a size (or with a misleading one: gemma-7b has 8.5 B parameters), matched with
# re.search on the lower-cased last path segment. (pattern, params, active, experts, experts/token, family, encoder)
_KNOWN_NAMES: tuple[tuple[str, int, int, int, int, str, bool], ...] = (
    (r"^distilgpt2$", 81_912_576, 0, 0, 0, "gpt2", False),
    (r"^gpt2$", 124_439_808, 0, 0, 0, "gpt2", False),
    (r"^gpt2-medium$", 354_823_168, 0, 0, 0, "gpt2", False),
    (r"^gpt2-large$", 774_030_080, 0, 0, 0, "gpt2", False),
    (r"^gpt2-xl$", 1_557_611_200, 0, 0, 0, "gpt2", False),
    (r"^distilbert-base", 66_362_880, 0, 0, 0, "distilbert", True),
    (r"^bert-base", 109_482_240, 0, 0, 0, "bert", True),
    (r"^bert-large", 335_141_888, 0, 0, 0, "bert", True),
    (r"^roberta-base", 124_645_632, 0, 0, 0, "roberta", True),
    (r"^roberta-large", 355_359_744, 0, 0, 0, "roberta", True),
    (r"^xlm-roberta-base", 278_043_648, 0, 0, 0, "xlm-roberta", True),
    (r"^xlm-roberta-large", 559_890_432, 0, 0, 0, "xlm-roberta", True),
    (r"minilm-l6", 22_713_216, 0, 0, 0, "bert", True),
    (r"minilm-l12", 33_360_000, 0, 0, 0, "bert", True),
    (r"mpnet-base", 109_486_464, 0, 0, 0, "mpnet", True),
    (r"^(bge|gte|e5)-small", 33_360_000, 0, 0, 0, "bert", True),
    (r"^(bge|gte|e5)-base", 109_482_240, 0, 0, 0, "bert", True),
    (r"^(bge|gte|e5)-large", 335_141_888, 0, 0, 0, "bert", True),
    (r"^bge-m3$", 567_754_752, 0, 0, 0, "xlm-roberta", True),
    (r"^phi-1_5$", 1_418_270_720, 0, 0, 0, "phi", False),
    (r"^phi-2$", 2_779_683_840, 0, 0, 0, "phi", False),
    (r"^phi-3(\.5)?-mini", 3_821_079_552, 0, 0, 0, "phi3", False),
    (r"^phi-3-small", 7_392_272_384, 0, 0, 0, "phi3small", False),
    (r"^phi-3-medium", 13_960_238_080, 0, 0, 0, "phi3", False),
    (r"^phi-4$", 14_659_507_200, 0, 0, 0, "phi3", False),
    (r"^gemma-2b", 2_506_172_416, 0, 0, 0, "gemma", False),
    (r"^gemma-7b", 8_537_680_896, 0, 0, 0, "gemma", False),
    (r"^mixtral-8x7b", 46_702_792_704, 12_879_925_248, 8, 2, "mixtral", False),
    (r"^mixtral-8x22b", 140_630_071_296, 39_158_976_512, 8, 2, "mixtral", False),
    (r"^qwen1\.5-moe-a2\.7b", 14_315_784_192, 2_689_060_864, 60, 4, "qwen2_moe", False),
    (r"^llama-4-scout-17b-16e", 108_641_793_536, 17_170_000_000, 16, 1, "llama4", False),
    (r"^llama-4-maverick-17b-128e", 401_583_781_376, 17_170_000_000, 128, 1, "llama4", False),
    (r"^gpt-oss-20b", 20_914_757_184, 3_610_000_000, 32, 4, "gpt_oss", False),
    (r"^gpt-oss-120b", 116_829_156_672, 5_130_000_000, 128, 4, "gpt_oss", False),
    (r"^deepseek-(v3|r1)(-\d+)?$", 671_026_419_200, 37_000_000_000, 256, 8, "deepseek_v3", False),
)

_SIZE = r"(\d+(?:\.\d+)?)"
_MOE_NAME = re.compile(rf"(?<![a-z0-9.])(\d+)x{_SIZE}b(?![a-z0-9])")
_ACTIVE_NAME = re.compile(rf"(?<![a-z0-9.])a{_SIZE}b(?![a-z0-9])")
_SIZE_NAME = re.compile(rf"(?<![a-z0-9.]){_SIZE}([bm])(?![a-z0-9])")
# A Mixtral-style NxM name shares attention and embeddings across experts: about 20 % of a dense model of the
# expert's size is shared, 80 % (the MLP) is replicated per expert (8x7B → 46.7 B, 8x22B → 141 B).
_MOE_MLP_FRACTION = 0.8
_MOE_NAME_EXPERTS_PER_TOKEN = 2


def _size_from_name(name: str) -> _NameSize | None:
    base = name.rsplit("/", 1)[-1].lower()
    for pattern, params, active, experts, per_token, family, encoder in _KNOWN_NAMES:
        known = re.search(pattern, base)
        if known:
            text = f"{known.group(0)}: {_human_params(params)}"
            return _NameSize(params, active or params, experts > 0, experts, per_token, None, text, family, encoder)
    moe = _MOE_NAME.search(base)
    if moe:
        experts = int(moe.group(1))
        expert = float(moe.group(2)) * 1e9
        moe_total = expert * (1 - _MOE_MLP_FRACTION) + experts * expert * _MOE_MLP_FRACTION
        per_token = min(_MOE_NAME_EXPERTS_PER_TOKEN, experts)
        moe_active = expert * (1 - _MOE_MLP_FRACTION) + per_token * expert * _MOE_MLP_FRACTION
        return _NameSize(int(moe_total), int(moe_active), True, experts, per_token, int(expert), moe.group(0))
    # The lookbehind keeps "a3b" (active size) and "2.5" (a version) out of the sizes.
    sizes = [float(m.group(1)) * (1e9 if m.group(2) == "b" else 1e6) for m in _SIZE_NAME.finditer(base)]
    if not sizes:
        return None
    total = max(sizes)
    active_match = _ACTIVE_NAME.search(base)
    if active_match:
        active_params = float(active_match.group(1)) * 1e9
        text = f"{total / 1e9:g}B-{active_match.group(0)}"
        return _NameSize(int(total), int(active_params), True, 0, 0, None, text)
    return _NameSize(int(total), int(total), False, 0, 0, None, f"{_human_params(total)}")


def _human_params(params: float) -> str:
    return f"{params / 1e9:g}B" if params >= 1e9 else f"{params / 1e6:g}M"


def _quantization_from_name(name: str) -> Quantization | None:
    low = name.lower()
    base = low.rsplit("/", 1)[-1]
    if base.endswith(".gguf") or "gguf" in low:
        gguf_type = _gguf_type(base) or DEFAULT_GGUF_TYPE
        return Quantization(QuantMethod.GGUF, GGUF_BITS_PER_WEIGHT[gguf_type], gguf_type=gguf_type)
    bits8 = bool(re.search(r"int8|8bit|8-bit|w8a16", low))
    if "gptq" in low:
        return Quantization(QuantMethod.GPTQ, 8.0 if bits8 else 4.0, 128, 2, has_zero_point=True)
    if "awq" in low:
        return Quantization(QuantMethod.AWQ, 4.0, 128, 2, has_zero_point=True)
    if re.search(r"fp8|float8", low):
        return Quantization(QuantMethod.FP8, 8.0, None, 4, fp8_weights=True)
    if "w4a16" in low or "int4" in low:
        return Quantization(QuantMethod.COMPRESSED_TENSORS, 4.0, 128, 2)
    if "w8a8" in low:
        return Quantization(QuantMethod.COMPRESSED_TENSORS, 8.0, None, 2)
    if re.search(r"bnb[-_]?4bit|(?<![a-z0-9])4bit(?![a-z0-9])|nf4", low):
        return Quantization(QuantMethod.BNB_4BIT, 4.0, 64, 4)
    if re.search(r"bnb[-_]?8bit|(?<![a-z0-9])(8bit|int8)(?![a-z0-9])", low):
        return Quantization(QuantMethod.BNB_8BIT, 8.0, None, 4)
    return None


def _family_from_name(name: str) -> str:
    low = name.lower()
    for needle, family in (
        ("mixtral", "mixtral"),
        ("mistral", "mistral"),
        ("qwen3", "qwen3"),
        ("qwen2", "qwen2"),
        ("qwen", "qwen2"),
        ("gemma-2", "gemma2"),
        ("gemma", "gemma"),
        ("phi-3", "phi3"),
        ("llama", "llama"),
        ("falcon", "falcon"),
        ("pythia", "gpt_neox"),
        ("gpt-neox", "gpt_neox"),
        ("deepseek", "deepseek"),
    ):
        if needle in low:
            return family
    return "unknown"


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
    quant = _quantization_from_name(name)
    if quant is not None and quant.method is QuantMethod.GGUF and name.lower().endswith(".gguf"):
        return _spec_from_gguf_name(name, size_bytes=None)
    sized = _size_from_name(name)
    if sized is None:
        raise ModelSpecError(
            f"cannot size model {name!r} from its name: it has no size (like '7B', '0.5B', '8x7B') and is not a "
            "well-known model; pass the model's directory or config.json instead"
        )
    notes = [f"estimated from the name ({sized.text}): nominal size, typical shape; pass a config for exact"]
    if quant is not None and quant.method is QuantMethod.GGUF and _gguf_type(name) is None:
        notes.append(f"no GGUF quant type in the name: assumed {DEFAULT_GGUF_TYPE}, the largest common one")
    return _spec_from_size(name, sized, quant, notes, source=SpecSource.NAME)


def _spec_from_size(
    name: str,
    sized: _NameSize,
    quant: Quantization | None,
    notes: list[str],
    *,
    source: SpecSource,
) -> ModelSpec:
    shape = _reference_shape(sized.per_expert_params / 1e9, encoder=sized.encoder)
    vocab = 30_522 if sized.encoder else _NAME_VOCAB
    tied = sized.encoder or sized.params < 4e9
    # Embeddings (and lm_head unless tied) stay unquantized; cap them so tiny models keep some quantizable part.
    embeddings = min(vocab * shape.hidden * (1 if tied else 2), sized.params // 2)
    dtype = "float32" if sized.encoder or sized.architecture in ("gpt2", "bert") else "bfloat16"
    if re.search(r"(?<![a-z0-9])(fp16|f16|float16)(?![a-z0-9])", name.lower()):
        dtype = "float16"
    return ModelSpec(
        name=name,
        architecture=sized.architecture or _family_from_name(name),
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
