"""Parameter counts from a ``config.json``: one function per architecture family.

Llama-style decoders (llama, mistral, mixtral, qwen2, qwen2-moe, qwen3, qwen3-moe, gemma, gemma2, phi3),
gpt2, gpt-neox, falcon, and the encoders (bert, roberta, xlm-roberta, camembert, distilbert) are counted
exactly, each checked by a test against what transformers instantiates on the meta device; any other
``model_type`` gets a generic llama-shaped estimate (:func:`generic_counts`).

Pure Python: never imports torch or transformers, nor :mod:`gpu.plan.specs` (which imports this module).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gpu.errors import ModelSpecError
from gpu.plan.model_names import Quantization, reference_shape, size_from_name
from gpu.units import DTYPE_BYTES

__all__ = [
    "FAMILIES",
    "SUPPORTED_ARCHITECTURES",
    "Cfg",
    "Counts",
    "generic_counts",
    "positive_int",
]

# -------------------------------------------------------------------------------------------- config reads


def positive_int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value) if value > 0 else None


class Cfg:
    """Typed reads from a config dict, with the attribute aliases transformers uses (``n_embd`` …)."""

    def __init__(self, raw: Mapping[str, Any], model_type: str) -> None:
        self.raw = raw
        self.model_type = model_type

    def req(self, *keys: str, default: int | None = None) -> int:
        for key in keys:
            value = positive_int(self.raw.get(key))
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
            value = positive_int(self.raw.get(key))
            if value is not None:
                return value
        return None

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw.get(key)
        return bool(value) if value is not None else default


@dataclass(frozen=True)
class Counts:
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


def _decoder_counts(c: Cfg) -> Counts:
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
    return Counts(
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


def _gpt2_counts(c: Cfg) -> Counts:
    h = c.req("n_embd", "hidden_size")
    layers = c.req("n_layer", "num_hidden_layers")
    heads = c.req("n_head", "num_attention_heads")
    vocab = c.req("vocab_size")
    positions = c.req("n_positions", "max_position_embeddings", default=1024)
    inner = c.req("n_inner", default=4 * h)
    matrices = 4 * h * h + 2 * h * inner
    per_layer = matrices + 3 * h + h + inner + h + 4 * h  # biases, then two LayerNorms (weight + bias)
    total = vocab * h + positions * h + layers * per_layer + 2 * h
    return Counts(total, total, layers * matrices, layers, h, inner, heads, h // heads, vocab, tied=True)


def _gpt_neox_counts(c: Cfg) -> Counts:
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
    return Counts(total, total, layers * matrices, layers, h, inner, heads, h // heads, vocab, tied)


def _falcon_counts(c: Cfg) -> Counts:
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
    return Counts(total, total, layers * matrices, layers, h, ffn, kv_heads, head_dim, vocab, tied)


def _bert_counts(c: Cfg) -> Counts:
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
    return Counts(total, total, layers * matrices, layers, h, inner, heads, h // heads, vocab, True, encoder=True)


def _distilbert_counts(c: Cfg) -> Counts:
    h = c.req("dim", "hidden_size")
    layers = c.req("n_layers", "num_hidden_layers")
    heads = c.req("n_heads", "num_attention_heads")
    vocab = c.req("vocab_size")
    positions = c.req("max_position_embeddings", default=512)
    inner = c.req("hidden_dim", "intermediate_size", default=4 * h)
    matrices = 4 * h * h + 2 * h * inner
    per_layer = matrices + 4 * h + inner + h + 2 * 2 * h
    total = (vocab + positions) * h + 2 * h + layers * per_layer
    return Counts(total, total, layers * matrices, layers, h, inner, heads, h // heads, vocab, True, encoder=True)


FAMILIES: Mapping[str, Callable[[Cfg], Counts]] = {
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

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(sorted(FAMILIES))
"""``model_type`` values counted exactly; any other falls back to a generic estimate."""


def generic_counts(
    c: Cfg,
    label: str,
    checkpoint_bytes: int | None,
    dtype: str,
    quantization: Quantization | None,
) -> Counts:
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
        return Counts(
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
        bytes_per_param = DTYPE_BYTES.get(dtype, 2) if quantization is None else quantization.bits / 8
        params = int(checkpoint_bytes / bytes_per_param)
        return _typical_shape_counts(
            params,
            params,
            params,
            vocab,
            note=(
                f"unknown architecture {c.model_type!r} without sizes: parameters from the checkpoint size on "
                "disk, KV cache from a typical shape"
            ),
        )
    sized = size_from_name(label)
    if sized is not None:
        return _typical_shape_counts(
            sized.params,
            sized.active,
            sized.per_expert_params,
            vocab,
            num_experts=sized.num_experts,
            experts_per_token=sized.experts_per_token,
            note=f"unknown architecture {c.model_type!r} without sizes: parameters from the name ({sized.text})",
        )
    raise ModelSpecError(
        f"config for {label!r} has unknown architecture {c.model_type!r} and no hidden_size/num_hidden_layers, "
        f"no weights on disk and no size in its name: add the weights or the sizes, or plan by a name with a "
        f"size (like '7B'); known architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _typical_shape_counts(
    total: int, active: int, shape_params: int, vocab: int, *, note: str, **experts: Any
) -> Counts:
    """Counts for a model known only by its size: a typical dense shape of ``shape_params`` parameters (per
    expert for MoE) gives layers, widths and KV geometry; 90% of the weights are taken as quantizable."""
    shape = reference_shape(shape_params / 1e9)
    return Counts(
        total=total,
        active=active,
        quantizable=int(total * 0.9),
        layers=shape.layers,
        hidden=shape.hidden,
        mlp_width=shape.hidden * 4,
        kv_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        vocab=vocab,
        tied=False,
        note=note,
        **experts,
    )
