"""Parameter formulas of the classic families, one function per family.

Llama-style decoders (llama, mistral, mixtral, qwen2, qwen2-moe, qwen3, qwen3-moe, gemma, gemma2, phi3), gpt2,
gpt-neox, falcon, and the encoders (bert, roberta, xlm-roberta, camembert, distilbert), each checked by a test
against what transformers instantiates on the meta device. The newer families live in :mod:`gpufleet.gpu.plan.families`
and :mod:`gpufleet.gpu.plan.multimodal`; :mod:`gpufleet.gpu.plan.formulas` is the registry of all of them.

Pure Python: never imports torch or transformers, nor :mod:`gpufleet.gpu.plan.specs` (which imports this module).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from gpufleet.gpu.plan.counting import Cfg, Counts, KvLayout, gqa_layout, kv_layout_from_layer_types

__all__ = ["CLASSIC_FAMILIES", "decoder_counts", "decoder_kv_layout"]

# ------------------------------------------------------------------------------------- architecture counts

# Families whose config defaults differ from the llama defaults.
_TIED_BY_DEFAULT = {"gemma", "gemma2", "gpt2", "falcon"}
_QKV_BIAS_ALWAYS = {"qwen2", "qwen2_moe"}  # q/k/v have biases regardless of config; o_proj has none
_NO_BIAS = {"mistral", "mixtral", "phi3"}
_QK_NORM = {"qwen3", "qwen3_moe"}  # RMSNorm over head_dim on q and k
# Qwen3MoeConfig has no head_dim default (hidden_size // num_attention_heads), unlike the dense Qwen3Config; the
# published Qwen3 MoE configs all name theirs.
_DEFAULT_HEAD_DIM = {"qwen3": 128, "gemma": 256, "gemma2": 256}


def decoder_counts(c: Cfg) -> Counts:
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
        kv=decoder_kv_layout(c, layers, kv_heads, head_dim),
    )


def decoder_kv_layout(c: Cfg, layers: int, kv_heads: int, head_dim: int) -> KvLayout:
    """Which decoder layers cache every token and which only a window.

    A ``layer_types`` list (transformers writes one into newer configs) says it per layer. Without one, Gemma 2
    alternates sliding and full layers (even layers slide) and Mistral/Mixtral slide on every layer when
    ``sliding_window`` is set; every other family caches every token on every layer.
    """
    window = c.opt("sliding_window")
    types = c.raw.get("layer_types")
    if isinstance(types, list) and len(types) == layers:
        return kv_layout_from_layer_types(types, token_elements=2 * kv_heads * head_dim, window=window)
    if c.model_type == "gemma2":
        window = window or 4096
        alternating = ["sliding_attention" if layer % 2 == 0 else "full_attention" for layer in range(layers)]
        return kv_layout_from_layer_types(alternating, token_elements=2 * kv_heads * head_dim, window=window)
    if c.model_type in ("mistral", "mixtral") and window:
        return kv_layout_from_layer_types(
            ["sliding_attention"] * layers, token_elements=2 * kv_heads * head_dim, window=window
        )
    return gqa_layout(layers, kv_heads, head_dim)


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


CLASSIC_FAMILIES: Mapping[str, Callable[[Cfg], Counts]] = {
    **dict.fromkeys(
        ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "phi3"),
        decoder_counts,
    ),
    "gpt2": _gpt2_counts,
    "gpt_neox": _gpt_neox_counts,
    "falcon": _falcon_counts,
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert"), _bert_counts),
    "distilbert": _distilbert_counts,
}
