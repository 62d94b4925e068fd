"""The record planning works on: a model in numbers (:class:`ModelSpec`) and where they came from (:class:`SpecSource`).

Built by :mod:`gpufleet.gpu.plan.specs` (from a config, safetensors headers or a name) and by
:mod:`gpufleet.gpu.plan.gguf` (from a GGUF file); read by the estimates and the placement rules. Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from gpufleet.gpu.plan.counting import KvLayout
from gpufleet.gpu.plan.model_names import Quantization
from gpufleet.gpu.plan.safetensors_header import CheckpointWeights

__all__ = ["ModelSpec", "SpecSource"]


class SpecSource(str, Enum):
    """Where a spec's numbers came from."""

    CONFIG = "config"  # counted from config.json (a formula, the meta device or the size on disk)
    SAFETENSORS = "safetensors"  # exact, from the checkpoint's safetensors headers
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
        exact: parameters were counted (headers, a formula or the meta device), not estimated from a name or
            a size on disk.
        notes: why-strings for a person reading a plan (estimates, assumptions); the first names the source
            of the parameter count.
        kv_layout: how the KV cache grows with the context (sliding windows, MLA latent, none for state-space
            layers); ``None`` for the plain layout (``num_layers`` layers of ``num_kv_heads`` x ``head_dim``).
        weights: exact sizes from the checkpoint's safetensors headers, when its files were read.
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
    kv_layout: KvLayout | None = None
    weights: CheckpointWeights | None = None
