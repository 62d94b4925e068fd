"""Memory a model needs to serve: weights, KV cache, activations and runtime overhead, each reported apart.

Pure Python. The numbers feed :mod:`gpufleet.gpu.plan.selection` (which GPU type) and the worker's memory budget (how
much to reserve before loading, via :func:`estimate_weights_bytes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gpufleet.gpu.errors import ConfigError
from gpufleet.gpu.plan.catalog import GpuType
from gpufleet.gpu.plan.model_names import QuantMethod
from gpufleet.gpu.plan.model_spec import ModelSpec
from gpufleet.gpu.units import DTYPE_BYTES, GiB, MiB, dtype_bytes

# With chunked prefill an engine runs at most this many tokens through the model in one step, which bounds the
# activations whatever the context (vLLM's max_num_batched_tokens for long contexts is of this order).
MAX_BATCHED_TOKENS = 8192
# Per GPU: the CUDA context (~500 MiB on Hopper), cuBLAS/cuDNN workspaces and CUDA graphs.
GPU_RUNTIME_BYTES = 1 * GiB
# On the CPU: the Python process with torch loaded.
CPU_RUNTIME_BYTES = 512 * MiB
# The caching allocator never packs perfectly: blocks split and freed out of order leave holes.
FRAGMENTATION_FRACTION = 0.03


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a model needs on its device(s), by part. Totals are over all GPUs of a placement.

    Attributes:
        weights_bytes: parameters as served (quantized layers in their format, the rest in ``dtype``).
        kv_cache_bytes: keys and values for ``context_length`` tokens of ``batch_size`` sequences.
        activation_bytes: the largest intermediate tensors of one forward step, plus the logits.
        runtime_bytes: CUDA context, workspaces and allocator fragmentation.
        dtype: the dtype unquantized tensors are served in.
        kv_cache_dtype: the dtype of the KV cache (``fp8`` on GPUs that support it).
    """

    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    runtime_bytes: int
    dtype: str
    kv_cache_dtype: str

    @property
    def overhead_bytes(self) -> int:
        """Activations plus runtime overhead: what is neither weights nor KV cache."""
        return self.activation_bytes + self.runtime_bytes

    @property
    def total_bytes(self) -> int:
        """Everything the model needs."""
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes


def estimate_weights_bytes(spec: ModelSpec, *, dtype_bytes: float | None = None) -> int:
    """Bytes of the weights once loaded.

    Quantized layers cost their packed bits plus scales and zero points per group; what quantizers leave alone
    (embeddings, ``lm_head``, norms, biases, MoE routers) costs ``dtype_bytes`` per parameter. A GGUF model is
    served dequantized (transformers' GGUF loading), so it costs ``dtype_bytes`` per parameter, not its file size.

    Args:
        spec: the model.
        dtype_bytes: bytes per unquantized parameter as served (2 for fp16/bf16, 4 for fp32); ``None`` for the
            checkpoint's own dtype.

    Returns:
        Bytes, rounded up.
    """
    quant = spec.quantization
    if spec.weights is not None and (quant is None or quant.method is not QuantMethod.GGUF):
        # Exact: the headers' floating-point tensors at the serving dtype, quantized tensors and scales as stored.
        return spec.weights.bytes_as_served(dtype_bytes)
    unquantized = float(dtype_bytes) if dtype_bytes is not None else float(DTYPE_BYTES.get(spec.dtype, 2))
    if quant is None:
        return math.ceil(spec.params * unquantized)
    if quant.method is QuantMethod.GGUF:
        # The worker loads GGUF through transformers, which dequantizes every tensor to the serving dtype: a Q4
        # file of a 7B model takes ~14 GB in fp16 once loaded, not its ~4 GB on disk.
        return math.ceil(spec.params * unquantized)
    quantized = spec.quantizable_params * quant.bytes_per_weight(spec.hidden_size)
    rest = (spec.params - spec.quantizable_params) * unquantized
    return math.ceil(quantized + rest)


def estimate_kv_cache_bytes(
    spec: ModelSpec, *, context_length: int, batch_size: int = 1, kv_dtype_bytes: float = 2
) -> int:
    """Bytes of the KV cache for ``batch_size`` sequences of ``context_length`` tokens.

    Per the model's :class:`~gpufleet.gpu.plan.counting.KvLayout`: GQA/MQA layers cache ``2 * kv_heads * head_dim``
    elements per token, MLA layers their compressed latent, sliding-window (and chunked) layers at most their
    window of tokens, state-space layers nothing. Without a layout: layers * KV heads * head dim * 2 per token.
    Encoders keep no cache (0).

    Raises:
        ConfigError: ``context_length`` or ``batch_size`` is not positive.
    """
    _check_positive(context_length=context_length, batch_size=batch_size)
    if spec.is_encoder:
        return 0
    if spec.kv_layout is not None:
        return math.ceil(spec.kv_layout.elements(context_length) * batch_size * kv_dtype_bytes)
    per_token = spec.num_layers * spec.num_kv_heads * spec.head_dim * 2 * kv_dtype_bytes
    return math.ceil(per_token * context_length * batch_size)


def estimate_activation_bytes(
    spec: ModelSpec, *, context_length: int, batch_size: int = 1, dtype_bytes: float = 2
) -> int:
    """Bytes of the largest live intermediate tensors in one forward step, plus the fp32 logits.

    A step holds, per token, the residual stream and a normed copy, the attention output and the MLP's two
    up-projections (gate and up, at the active MLP width); tokens per step are capped at
    :data:`MAX_BATCHED_TOKENS` (chunked prefill). Generation adds the last position's logits in fp32.

    Raises:
        ConfigError: ``context_length`` or ``batch_size`` is not positive.
    """
    _check_positive(context_length=context_length, batch_size=batch_size)
    tokens = batch_size * context_length if spec.is_encoder else min(batch_size * context_length, MAX_BATCHED_TOKENS)
    per_token = (4 * spec.hidden_size + 2 * spec.mlp_width) * dtype_bytes
    logits = 0 if spec.is_encoder else batch_size * spec.vocab_size * 4
    return math.ceil(tokens * per_token + logits)


def estimate_runtime_bytes(*, weights_bytes: int, kv_cache_bytes: int, gpu_count: int = 1, on_cpu: bool = False) -> int:
    """Bytes for the runtime itself: per-device context and workspaces, plus allocator fragmentation."""
    fixed = CPU_RUNTIME_BYTES if on_cpu else GPU_RUNTIME_BYTES * gpu_count
    return fixed + math.ceil(FRAGMENTATION_FRACTION * (weights_bytes + kv_cache_bytes))


def serving_dtype(spec: ModelSpec, gpu: GpuType) -> str:
    """The dtype unquantized tensors are served in on ``gpu`` (the worker's ``Precision.AUTO`` rule).

    bf16 where the GPU has it (fp16 checkpoints stay fp16: converting them loses precision for nothing), fp16
    before Ampere, fp32 on the CPU.
    """
    if gpu.is_cpu:
        return "float32"
    if spec.dtype == "float16" or not gpu.supports_bf16:
        return "float16"
    return "bfloat16"


def kv_cache_dtype(spec: ModelSpec, gpu: GpuType) -> str:
    """``fp8`` where the GPU runs an FP8 KV cache (Hopper and later), else the serving dtype."""
    if gpu.supports_fp8_kv_cache and not spec.is_encoder:
        return "fp8"
    return serving_dtype(spec, gpu)


def estimate_memory(
    spec: ModelSpec,
    gpu: GpuType,
    *,
    context_length: int,
    batch_size: int = 1,
    gpu_count: int = 1,
) -> MemoryEstimate:
    """Everything ``spec`` needs on ``gpu_count`` devices of type ``gpu``, by part.

    Weights and KV cache are totals (tensor parallelism splits them across devices); activations and the
    runtime overhead are paid on every device (each holds the full residual stream), so they scale with
    ``gpu_count``.

    Args:
        spec: the model.
        gpu: the device type, which decides the serving dtype and the KV cache dtype.
        context_length: tokens per sequence the KV cache must hold.
        batch_size: sequences served at once.
        gpu_count: devices the model is split across.

    Raises:
        ConfigError: a non-positive context length, batch size or GPU count.
    """
    _check_positive(context_length=context_length, batch_size=batch_size, gpu_count=gpu_count)
    dtype = serving_dtype(spec, gpu)
    kv_dtype = kv_cache_dtype(spec, gpu)
    weights = estimate_weights_bytes(spec, dtype_bytes=dtype_bytes(dtype))
    kv = estimate_kv_cache_bytes(
        spec, context_length=context_length, batch_size=batch_size, kv_dtype_bytes=dtype_bytes(kv_dtype)
    )
    activations = gpu_count * estimate_activation_bytes(
        spec, context_length=context_length, batch_size=batch_size, dtype_bytes=dtype_bytes(dtype)
    )
    runtime = estimate_runtime_bytes(weights_bytes=weights, kv_cache_bytes=kv, gpu_count=gpu_count, on_cpu=gpu.is_cpu)
    return MemoryEstimate(
        weights_bytes=weights,
        kv_cache_bytes=kv,
        activation_bytes=activations,
        runtime_bytes=runtime,
        dtype=dtype,
        kv_cache_dtype=kv_dtype,
    )


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
