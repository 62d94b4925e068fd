"""The general path: counts for a ``model_type`` without a formula, never a small guess.

In order: the exact parameters from the checkpoint's safetensors headers when the weights are there; else a
count of the model transformers builds on the meta device, when transformers is installed
(:mod:`gpufleet.gpu.plan.meta_count`); else the checkpoint's size on disk (an index's ``total_size`` or the weight
files) divided by the bytes per parameter; else a refusal naming the facts that are missing. A llama-shaped
guess from ``hidden_size`` and ``num_hidden_layers`` is never made: on a DBRX-like or state-space config it
is off by a factor of eight in either direction.

The geometry a KV cache and the activations are sized from comes, on the paths without transformers, from the
config's own keys when it has them, else from a typical model of the counted size (both said in the notes).

Pure Python apart from the optional meta-device count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from gpufleet.gpu.errors import ModelSpecError
from gpufleet.gpu.plan.counting import Cfg, Counts, KvKind, KvLayout, gqa_layout, kv_layout_from_layer_types
from gpufleet.gpu.plan.meta_count import count_on_meta_device, transformers_available
from gpufleet.gpu.plan.model_names import Quantization, reference_shape
from gpufleet.gpu.plan.safetensors_header import CheckpointWeights
from gpufleet.gpu.units import DTYPE_BYTES

__all__ = ["general_counts", "geometry_from_keys"]


def general_counts(
    text: Cfg,
    config: Mapping[str, Any],
    *,
    label: str,
    weights: CheckpointWeights | None,
    checkpoint_bytes: int | None,
    dtype: str,
    quantization: Quantization | None,
    formulas: tuple[str, ...],
) -> tuple[Counts, str]:
    """Counts for a model without a formula, and the why-string naming the source of its parameters.

    Args:
        text: the language model's part of the config (for the geometry).
        config: the whole config (for the meta-device count, which builds the whole model).
        label: the model's name, for messages.
        weights: what the safetensors headers say, when the files are there.
        checkpoint_bytes: the checkpoint's size on disk when known without headers.
        dtype: the checkpoint's dtype (bytes per parameter of an unquantized checkpoint).
        quantization: the checkpoint's quantization, which sets its bytes per parameter.
        formulas: the model types that have a formula, for the refusal message.

    Raises:
        ModelSpecError: none of the sources is available.
    """
    model_type = str(config.get("model_type") or text.model_type)
    if weights is not None:
        return geometry_from_keys(text, weights.params), f"parameters: safetensors headers ({weights.files_text})"
    tried = ""
    if transformers_available():
        try:
            meta = count_on_meta_device(config)
        except ModelSpecError as exc:
            tried = f"; {exc}"
        else:
            return meta.counts, f"parameters: meta-device count (transformers {meta.version}, {meta.model_class})"
    else:
        tried = "; transformers is not installed for a meta-device count"
    if checkpoint_bytes:
        bytes_per_param = DTYPE_BYTES.get(dtype, 2) if quantization is None else quantization.bits / 8
        params = int(checkpoint_bytes / bytes_per_param)
        return geometry_from_keys(text, params), (
            f"parameters: checkpoint size on disk ({checkpoint_bytes} bytes at {bytes_per_param:g} bytes per "
            f"parameter) for model_type {model_type!r}, which has no formula{tried}"
        )
    install = "" if transformers_available() else ", or install transformers for a meta-device count"
    raise ModelSpecError(
        f"cannot count the parameters of {label!r}: model_type {model_type!r} has no formula here and no "
        f"weight files were found to read sizes from{tried}. Add the checkpoint's .safetensors files (or its "
        f"model.safetensors.index.json){install}; formulas exist for: {', '.join(formulas)}"
    )


def geometry_from_keys(c: Cfg, params: int) -> Counts:
    """Counts of ``params`` parameters with the geometry the config's own keys give, or a typical shape's.

    Every parameter is taken as quantizable-or-not by a typical 90 % share and as active (an MoE's per-token
    share is not known without a formula): both err towards more memory.
    """
    h = c.opt("hidden_size", "n_embd", "d_model", "dim")
    layers = c.opt("num_hidden_layers", "n_layer", "num_layers", "n_layers")
    vocab = c.opt("vocab_size") or 32_000
    if not (h and layers):
        shape = reference_shape(params / 1e9)
        return Counts(
            total=params,
            active=params,
            quantizable=int(params * 0.9),
            layers=shape.layers,
            hidden=shape.hidden,
            mlp_width=4 * shape.hidden,
            kv_heads=shape.kv_heads,
            head_dim=shape.head_dim,
            vocab=vocab,
            tied=False,
            note="KV cache and activations from a typical shape of this size (the config has no sizes)",
        )
    heads = c.opt("num_attention_heads", "n_head", "num_heads", "n_heads") or max(h // 128, 1)
    kv_heads = c.opt("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num") or heads
    head_dim = c.opt("head_dim") or h // heads
    counts = Counts(
        total=params,
        active=params,
        quantizable=int(params * 0.9),
        layers=layers,
        hidden=h,
        mlp_width=c.opt("intermediate_size", "ffn_hidden_size", "n_inner") or 4 * h,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=vocab,
        tied=c.flag("tie_word_embeddings", False),
        note="KV cache and activations from the config's own sizes (no formula for this model_type)",
    )
    return replace(counts, kv=_kv_from_keys(c, layers, kv_heads, head_dim))


def _kv_from_keys(c: Cfg, layers: int, kv_heads: int, head_dim: int) -> KvLayout:
    """Per-layer types when the config lists them (``layer_types``; Jamba's attention period), the MLA latent
    when it names one, else every layer caching keys and values."""
    window = c.opt("sliding_window", "attention_chunk_size")
    kv_rank = c.opt("kv_lora_rank")
    kind, elements = (
        (KvKind.MLA, kv_rank + (c.opt("qk_rope_head_dim") or 0)) if kv_rank else (KvKind.GQA, 2 * kv_heads * head_dim)
    )
    types = c.raw.get("layer_types")
    if c.model_type == "jamba" and not isinstance(types, list):
        period, offset = c.req("attn_layer_period", default=8), c.opt("attn_layer_offset") or 0
        types = ["attention" if i % period == offset else "mamba" for i in range(layers)]
    if isinstance(types, list) and len(types) == layers:
        return kv_layout_from_layer_types(types, token_elements=elements, window=window, kind=kind)
    if kind is KvKind.MLA:
        return KvLayout(kind, elements, full_layers=layers)
    return gqa_layout(layers, kv_heads, head_dim)
