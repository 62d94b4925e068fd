"""Parameter formulas of the newer text families: DBRX, DeepSeek V2/V3 (multi-head latent attention with shared
and routed experts) and the state-space models Mamba and Mamba-2.

Each is recognised by its ``model_type`` only (:mod:`gpufleet.gpu.plan.formulas` holds the registry) and checked by a
test against what transformers instantiates on the meta device. Each also says how the model caches: DBRX a
plain GQA cache, DeepSeek the compressed MLA latent, Mamba nothing per token.

Pure Python: never imports torch or transformers.
"""

from __future__ import annotations

from gpufleet.gpu.plan.counting import Cfg, Counts, KvKind, KvLayout, gqa_layout

__all__ = ["dbrx_counts", "deepseek_counts", "mamba2_counts", "mamba_counts"]


def dbrx_counts(c: Cfg) -> Counts:
    """DBRX: fused QKV with grouped KV heads, bias-free LayerNorms, a routed MoE of gated experts on every layer.

    Sizes sit under ``d_model``/``n_layers``/``n_heads`` and two nested configs: ``attn_config`` (``kv_n_heads``)
    and ``ffn_config`` (``ffn_hidden_size``, ``moe_num_experts``, ``moe_top_k``), with transformers' defaults.
    """
    h = c.req("d_model", "hidden_size")
    layers = c.req("n_layers", "num_hidden_layers")
    heads = c.req("n_heads", "num_attention_heads")
    vocab = c.req("vocab_size")
    attn, ffn = c.sub("attn_config"), c.sub("ffn_config")
    kv_heads = attn.req("kv_n_heads", default=1)
    experts = ffn.req("moe_num_experts", default=4)
    per_token = ffn.req("moe_top_k", default=1)
    width = ffn.req("ffn_hidden_size", default=3584)
    head_dim = h // heads
    tied = c.flag("tie_word_embeddings", False)

    attention = h * (h + 2 * kv_heads * head_dim) + h * h  # Wqkv, out_proj (no biases)
    expert_mlp = 3 * h * width  # w1, v1, w2
    router = h * experts
    norms = 2 * h
    embeddings = vocab * h * (1 if tied else 2) + h  # wte, lm_head unless tied, norm_f
    total = layers * (attention + experts * expert_mlp + router + norms) + embeddings
    active = layers * (attention + per_token * expert_mlp + router + norms) + embeddings
    return Counts(
        total=total,
        active=active,
        quantizable=layers * (attention + experts * expert_mlp),
        layers=layers,
        hidden=h,
        mlp_width=per_token * width,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=vocab,
        tied=tied,
        num_experts=experts,
        experts_per_token=per_token,
        kv=gqa_layout(layers, kv_heads, head_dim),
    )


def deepseek_counts(c: Cfg) -> Counts:
    """DeepSeek V2/V3 (and Kimi K2, which ships as ``deepseek_v3``): MLA attention plus shared and routed experts.

    Attention: queries through a low-rank ``q_lora_rank`` bottleneck (a plain projection when it is null),
    keys and values through one ``kv_lora_rank`` latent plus a shared rotary key of ``qk_rope_head_dim``.
    The first ``first_k_dense_replace`` layers are dense (``intermediate_size``), the others hold
    ``n_routed_experts`` routed and ``n_shared_experts`` shared experts of ``moe_intermediate_size`` (every
    ``moe_layer_freq``-th layer). The multi-token-prediction layers some checkpoints carry
    (``num_nextn_predict_layers``) are not instantiated by transformers and are not counted here either.

    The KV cache is the latent an MLA engine keeps: ``kv_lora_rank + qk_rope_head_dim`` elements per token and
    layer, far less than the ``2 * heads * head_dim`` a plain formula gives.
    """
    h = c.req("hidden_size")
    layers = c.req("num_hidden_layers")
    heads = c.req("num_attention_heads")
    vocab = c.req("vocab_size")
    intermediate = c.req("intermediate_size")
    q_rank = c.opt("q_lora_rank")
    kv_rank = c.req("kv_lora_rank")
    rope_dim = c.req("qk_rope_head_dim")
    nope_dim = c.req("qk_nope_head_dim")
    v_dim = c.req("v_head_dim")
    routed = c.opt("n_routed_experts") or 0
    shared = c.opt("n_shared_experts") or 0
    per_token = c.opt("num_experts_per_tok") or 0
    expert_width = c.req("moe_intermediate_size", default=intermediate)
    first_dense = c.opt("first_k_dense_replace") or 0
    layer_freq = c.req("moe_layer_freq", default=1)
    bias = c.flag("attention_bias", False)
    tied = c.flag("tie_word_embeddings", False)

    q_head = nope_dim + rope_dim
    # Queries through the low-rank bottleneck (a, its norm, b) or one plain projection.
    lora_queries = h * q_rank + q_rank + q_rank * heads * q_head + q_rank * bias if q_rank else 0
    queries = lora_queries or h * heads * q_head
    keys_values = h * (kv_rank + rope_dim) + (kv_rank + rope_dim if bias else 0) + kv_rank  # a (+bias), norm
    keys_values += kv_rank * heads * (nope_dim + v_dim)  # kv_b_proj
    output = heads * v_dim * h + (h if bias else 0)
    attention = queries + keys_values + output
    norms = 2 * h
    dense_mlp = 3 * h * intermediate
    expert_mlp = 3 * h * expert_width

    total = active = quantizable = 0
    moe_layers = 0
    for layer in range(layers):
        sparse = routed > 0 and layer >= first_dense and layer % layer_freq == 0
        if sparse:
            moe_layers += 1
            router = h * routed
            shared_mlp = shared * expert_mlp
            total += attention + norms + routed * expert_mlp + shared_mlp + router
            active += attention + norms + per_token * expert_mlp + shared_mlp + router
            quantizable += attention + routed * expert_mlp + shared_mlp
        else:
            total += attention + norms + dense_mlp
            active += attention + norms + dense_mlp
            quantizable += attention + dense_mlp
    embeddings = vocab * h * (1 if tied else 2) + h
    return Counts(
        total=total + embeddings,
        active=active + embeddings,
        quantizable=quantizable,
        layers=layers,
        hidden=h,
        mlp_width=(per_token + shared) * expert_width if moe_layers else intermediate,
        kv_heads=heads,
        head_dim=q_head,
        vocab=vocab,
        tied=tied,
        num_experts=routed if moe_layers else 0,
        experts_per_token=per_token if moe_layers else 0,
        kv=KvLayout(KvKind.MLA, kv_rank + rope_dim, full_layers=layers),
    )


def _state_space_counts(c: Cfg, *, h: int, layers: int, per_layer: int, quantizable_layer: int, inner: int) -> Counts:
    vocab = c.req("vocab_size")
    tied = c.flag("tie_word_embeddings", c.model_type == "mamba")
    embeddings = vocab * h * (1 if tied else 2) + h  # embeddings, lm_head unless tied, norm_f
    total = layers * per_layer + embeddings
    return Counts(
        total=total,
        active=total,
        quantizable=layers * quantizable_layer,
        layers=layers,
        hidden=h,
        mlp_width=inner,
        kv_heads=0,
        head_dim=0,
        vocab=vocab,
        tied=tied,
        kv=KvLayout(KvKind.NONE, 0, 0, stateless_layers=layers),
    )


def mamba_counts(c: Cfg) -> Counts:
    """Mamba (selective state space): no attention, so no KV cache; a fixed-size state per sequence instead."""
    h = c.req("hidden_size", "d_model")
    layers = c.req("num_hidden_layers", "n_layer")
    inner = c.req("intermediate_size", default=int(c.raw.get("expand") or 2) * h)
    state = c.req("state_size", "d_state", default=16)
    kernel = c.req("conv_kernel", "d_conv", default=4)
    rank = c.opt("time_step_rank") or -(-h // 16)  # "auto" in the config means ceil(hidden / 16)
    bias = c.flag("use_bias", False)
    conv_bias = c.flag("use_conv_bias", True)
    projections = 2 * inner * h + (rank + 2 * state) * inner + inner * rank + h * inner  # in, x, dt, out
    per_layer = (
        h  # norm
        + projections
        + inner * state  # A_log
        + inner  # D
        + inner * kernel
        + (inner if conv_bias else 0)
        + inner  # dt_proj bias
        + (2 * inner + h if bias else 0)
    )
    return _state_space_counts(c, h=h, layers=layers, per_layer=per_layer, quantizable_layer=projections, inner=inner)


def mamba2_counts(c: Cfg) -> Counts:
    """Mamba-2 (state-space duality): multi-head SSM with grouped B/C, no attention and no KV cache."""
    h = c.req("hidden_size")
    layers = c.req("num_hidden_layers")
    expand = c.raw.get("expand") or 2
    heads = c.req("num_heads")
    inner = int(expand * h)
    state = c.req("state_size", default=128)
    groups = c.req("n_groups", default=1)
    kernel = c.req("conv_kernel", default=4)
    bias = c.flag("use_bias", False)
    conv_bias = c.flag("use_conv_bias", True)
    conv_dim = inner + 2 * groups * state
    projections = h * (2 * inner + 2 * groups * state + heads) + inner * h  # in_proj, out_proj
    per_layer = (
        h  # norm
        + projections
        + conv_dim * kernel
        + (conv_dim if conv_bias else 0)
        + 3 * heads  # dt_bias, A_log, D
        + inner  # gated RMSNorm
        + ((2 * inner + 2 * groups * state + heads) + h if bias else 0)
    )
    return _state_space_counts(c, h=h, layers=layers, per_layer=per_layer, quantizable_layer=projections, inner=inner)
