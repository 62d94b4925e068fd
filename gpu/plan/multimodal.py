"""Parameter formulas of multimodal checkpoints: the language model plus its vision tower and projector.

A multimodal checkpoint holds more than its text model: counting the text model alone plans 6-8 % too small
(Llama 4, Qwen2.5-VL). Each family here counts the vision encoder, the projector between them and the text
model; the registry (:mod:`gpufleet.gpu.plan.formulas`) recognises them by their top-level ``model_type``. Both the
nested layout (``text_config`` + ``vision_config``) and the older flat one (text sizes at the top level, as
Qwen2.5-VL's published configs have them) are read.

Pure Python: never imports torch or transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from gpufleet.gpu.plan.architectures import decoder_counts
from gpufleet.gpu.plan.counting import Cfg, Counts, KvLayout, kv_layout_from_layer_types

__all__ = ["llama4_counts", "qwen2_5_vl_counts", "text_part"]


def text_part(c: Cfg, text_type: str) -> Cfg:
    """The language model's config: ``text_config`` over the top level (flat configs keep the sizes on top)."""
    merged: dict[str, Any] = {k: v for k, v in c.raw.items() if k not in ("text_config", "vision_config")}
    text = c.raw.get("text_config")
    if isinstance(text, Mapping):
        merged.update(text)
    return Cfg(merged, text_type)


def _with_vision(text: Counts, vision_params: int) -> Counts:
    """Text counts plus a vision tower: every vision parameter is used per image, and none is quantized
    (quantizers leave vision towers in 16-bit), so they add to total and active but not to quantizable."""
    return replace(text, total=text.total + vision_params, active=text.active + vision_params)


# ------------------------------------------------------------------------------------------------- Llama 4


def llama4_counts(c: Cfg) -> Counts:
    """Llama 4 (Scout, Maverick): an MoE text model with a shared expert, plus a ViT and a pixel-shuffle projector."""
    text = text_part(c, "llama4_text")
    counts = _llama4_text(text)
    vision = _llama4_vision(c.sub("vision_config", "llama4_vision_model"), text_hidden=counts.hidden)
    return _with_vision(counts, vision)


def _llama4_text(c: Cfg) -> Counts:
    h = c.req("hidden_size")
    layers = c.req("num_hidden_layers")
    heads = c.req("num_attention_heads")
    kv_heads = c.req("num_key_value_heads", default=heads)
    head_dim = c.req("head_dim", default=h // heads)
    vocab = c.req("vocab_size")
    expert_width = c.req("intermediate_size")
    dense_width = c.req("intermediate_size_mlp")
    experts = c.req("num_local_experts", default=16)
    per_token = c.req("num_experts_per_tok", default=1)
    step = c.req("interleave_moe_layer_step", default=1)
    moe_layers = set(c.int_list("moe_layers") or range(step - 1, layers, step))
    tied = c.flag("tie_word_embeddings", False)

    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    attention = 2 * h * q_out + 2 * h * kv_out
    attention += q_out + 2 * kv_out + h if c.flag("attention_bias", False) else 0
    norms = 2 * h
    expert_mlp = 3 * h * expert_width
    total = active = quantizable = 0
    for layer in range(layers):
        if layer in moe_layers:
            shared, router = expert_mlp, h * experts
            total += attention + norms + experts * expert_mlp + shared + router
            active += attention + norms + per_token * expert_mlp + shared + router
            quantizable += attention + experts * expert_mlp + shared
        else:
            dense = 3 * h * dense_width
            total += attention + norms + dense
            active += attention + norms + dense
            quantizable += attention + dense
    embeddings = vocab * h * (1 if tied else 2) + h
    return Counts(
        total=total + embeddings,
        active=active + embeddings,
        quantizable=quantizable,
        layers=layers,
        hidden=h,
        mlp_width=(per_token + 1) * expert_width if moe_layers else dense_width,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=vocab,
        tied=tied,
        num_experts=experts if moe_layers else 0,
        experts_per_token=per_token if moe_layers else 0,
        kv=_llama4_kv(c, layers, 2 * kv_out),
    )


def _llama4_kv(c: Cfg, layers: int, token_elements: int) -> KvLayout:
    """Three of four layers use chunked local attention (they hold at most ``attention_chunk_size`` tokens);
    the layers without RoPE attend globally."""
    chunk = c.opt("attention_chunk_size")
    types = c.raw.get("layer_types")
    if not (isinstance(types, list) and len(types) == layers):
        interval = c.req("no_rope_layer_interval", default=4)
        no_rope = c.int_list("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
        types = ["chunked_attention" if rope and chunk else "full_attention" for rope in no_rope]
    return kv_layout_from_layer_types(types, token_elements=token_elements, window=chunk)


def _llama4_vision(v: Cfg, *, text_hidden: int) -> int:
    h = v.req("hidden_size", default=768)
    layers = v.req("num_hidden_layers", default=34)
    inner = v.req("intermediate_size", default=5632)
    channels = v.req("num_channels", default=3)
    patch = v.req("patch_size", default=14)
    image = v.req("image_size", default=448)
    output_dim = v.req("vision_output_dim", default=7680)
    projector_in = v.req("projector_input_dim", default=4096)
    projector_out = v.req("projector_output_dim", default=4096)
    patches = (image // patch) ** 2
    embeddings = h + (patches + 1) * h + h * channels * patch * patch  # class token, positions, patch linear
    block = 4 * (h * h + h) + 2 * h * inner + inner + h + 4 * h  # q/k/v/o with biases, fc1/fc2, two LayerNorms
    adapter = inner * projector_in + projector_out * projector_out  # pixel-shuffle MLP (no biases)
    projector = output_dim * text_hidden + (text_hidden if v.flag("multi_modal_projector_bias", False) else 0)
    return embeddings + 4 * h + layers * block + adapter + projector  # 4h: pre and post LayerNorms


# --------------------------------------------------------------------------------------------- Qwen2.5-VL


def qwen2_5_vl_counts(c: Cfg) -> Counts:
    """Qwen2.5-VL: a Qwen2 text model plus a windowed-attention ViT with a gated MLP and a patch merger."""
    counts = decoder_counts(text_part(c, "qwen2"))
    v = c.sub("vision_config", "qwen2_5_vl_vision")
    h = v.req("hidden_size", default=1280)
    depth = v.req("depth", default=32)
    inner = v.req("intermediate_size", default=3420)
    channels = v.req("in_channels", default=3)
    patch = v.req("patch_size", default=14)
    temporal = v.req("temporal_patch_size", default=2)
    merge = v.req("spatial_merge_size", default=2)
    out = v.req("out_hidden_size", default=counts.hidden)
    patch_embed = h * channels * temporal * patch * patch  # a Conv3d without bias
    block = 2 * h + (3 * h * h + 3 * h) + (h * h + h) + (3 * h * inner + 2 * inner + h)  # norms, qkv, proj, mlp
    merged = h * merge * merge
    merger = h + merged * merged + merged + out * merged + out  # ln_q, two linears with biases
    return _with_vision(counts, patch_embed + depth * block + merger)
