"""GPU selection: which GPU type (and how many) serves a model, at what memory utilization.

:func:`plan` is the rich interface (a :class:`Placement` with the estimate, fallbacks, reasons and engine
settings); :func:`get_gpu_placement` is ``(gpu_type, gpu_count, memory_utilization)``; :func:`get_gpu_config` is
the two-value form ``(gpu_type, memory_utilization)``, which cannot say how many GPUs a model needs. All are pure
functions of the model and the catalog: the router calls them on machines without torch. Which Celery queue serves
a GPU type is not planning's business: ``gpufleet.tasks.names`` decides that.

The rules:

- a type fits when weights + KV cache + overhead <= :data:`MAX_MEMORY_UTILIZATION` * its memory;
- among single GPUs that fit, the cheapest per hour wins (``prefer="memory"``: the smallest memory);
- when no single GPU fits, 2, 4 or 8 of one type (tensor parallel), cheapest in total;
- compatibility: FP8 weights only on FP8 hardware; bf16 models run in fp16 before Ampere; quantized formats
  other than GGUF need CUDA;
- ``cpu`` only when allowed and either the only allowed type or the only one that fits;
- utilization is conservative by size (small 0.90, medium 0.85, 13-30 B 0.75, 30-100 B 0.70, larger 0.60,
  sharded 0.55) and raised where the model would not fit otherwise.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from gpufleet.gpu.errors import ConfigError, PlanningError
from gpufleet.gpu.plan.catalog import CPU, GpuType, all_types, get_gpu_type
from gpufleet.gpu.plan.estimate import MemoryEstimate, estimate_memory
from gpufleet.gpu.plan.model_names import QuantMethod
from gpufleet.gpu.plan.model_spec import ModelSpec
from gpufleet.gpu.plan.specs import load_spec
from gpufleet.gpu.units import GiB, fmt_bytes

MAX_MEMORY_UTILIZATION = 0.92
"""The highest fraction of a device a plan uses: the rest is for other processes and estimate error."""

GPU_COUNTS = (1, 2, 4, 8)
"""Tensor-parallel sizes tried, in order, when one GPU is not enough."""

DEFAULT_CONTEXT_LENGTH = 4096
"""Context planned for when neither the caller nor a config says (a name-only plan)."""

MAX_DEFAULT_CONTEXT_LENGTH = 8192
"""The default context is the model's own maximum, capped here: long contexts are asked for explicitly."""

SHARDED_UTILIZATION = 0.55

# (params below this, default utilization, size class): small models take most of a device, large ones leave
# headroom for the estimate's error, which grows with the model.
_UTILIZATION_BY_SIZE: tuple[tuple[float, float, str], ...] = (
    (3e9, 0.90, "small model (< 3 B parameters)"),
    (13e9, 0.85, "medium model (3-13 B parameters)"),
    (30e9, 0.75, "large model (13-30 B parameters)"),
    (100e9, 0.70, "large model (30-100 B parameters)"),
    (float("inf"), 0.60, "very large model (>= 100 B parameters)"),
)


class Preference(str, Enum):
    """What :func:`plan` minimizes among the types that fit."""

    COST = "cost"  # price per hour
    MEMORY = "memory"  # device memory (leaves the big GPUs for the big models)


@dataclass(frozen=True)
class EngineSettings:
    """Recommended serving-engine settings for a placement (named as vLLM names them).

    Attributes:
        gpu_memory_utilization: fraction of each device the engine may use.
        tensor_parallel_size: devices the model is split across.
        dtype: dtype of the unquantized tensors.
        kv_cache_dtype: ``fp8`` on Hopper and later, else ``auto`` (the serving dtype).
        max_model_len: context length planned for.
        enable_chunked_prefill: split long prompts into steps, bounding activation memory.
        enable_prefix_caching: reuse the KV cache of shared prompt prefixes.
        block_size: tokens per KV cache block.
        quantization: the engine's quantization method, ``None`` when unquantized.
        pytorch_cuda_alloc_conf: value for ``PYTORCH_CUDA_ALLOC_CONF``; ``None`` on the CPU.
    """

    gpu_memory_utilization: float
    tensor_parallel_size: int
    dtype: str
    kv_cache_dtype: str
    max_model_len: int
    enable_chunked_prefill: bool
    enable_prefix_caching: bool
    block_size: int
    quantization: str | None
    pytorch_cuda_alloc_conf: str | None

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class Placement:
    """Where a model runs and why.

    Attributes:
        gpu_type: catalog name of the chosen type (``h100``, ``cpu``).
        gpu_count: devices of that type (more than 1: tensor parallel).
        memory_utilization: fraction of each device the model may use.
        params: total parameters.
        weights_bytes: weights as served, over all devices.
        kv_cache_bytes: KV cache for the planned context and batch, over all devices.
        overhead_bytes: activations and runtime overhead, over all devices.
        quantization: quantization label (``none``, ``gptq-4bit``, ``fp8``, ``gguf-Q4_K_M`` …).
        is_moe: the model is a mixture of experts.
        fallbacks: other types that would also fit with the same device count, best first.
        reasons: why-strings for a person.
        engine: recommended engine settings.
    """

    gpu_type: str
    gpu_count: int
    memory_utilization: float
    params: int
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    quantization: str
    is_moe: bool
    fallbacks: tuple[str, ...]
    reasons: tuple[str, ...]
    engine: EngineSettings

    @property
    def total_bytes(self) -> int:
        """Weights, KV cache and overhead together."""
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes

    def to_dict(self) -> dict[str, Any]:
        """The placement as a JSON-ready dict, keyed by the field names."""
        data = asdict(self)
        data["fallbacks"] = list(self.fallbacks)
        data["reasons"] = list(self.reasons)
        data["engine"] = self.engine.to_dict()
        return data


@dataclass(frozen=True)
class _Option:
    gpu: GpuType
    count: int
    estimate: MemoryEstimate
    utilization: float

    @property
    def capacity_bytes(self) -> int:
        return self.gpu.memory_bytes * self.count

    def key(self, prefer: Preference) -> tuple[float, float, str]:
        cost = self.gpu.price_per_hour_usd * self.count
        if prefer is Preference.MEMORY:
            return (float(self.capacity_bytes), cost, self.gpu.name)
        return (cost, float(self.capacity_bytes), self.gpu.name)


def default_context_length(spec: ModelSpec) -> int:
    """The context planned for when none is given: the model's maximum capped at 8192, else 4096."""
    if spec.max_position_embeddings:
        return min(spec.max_position_embeddings, MAX_DEFAULT_CONTEXT_LENGTH)
    return DEFAULT_CONTEXT_LENGTH


def base_utilization(params: int, gpu_count: int = 1) -> tuple[float, str]:
    """The default memory utilization for a model of ``params`` on ``gpu_count`` devices, with its why."""
    if gpu_count > 1:
        return SHARDED_UTILIZATION, f"sharded over {gpu_count} GPUs"
    for limit, utilization, label in _UTILIZATION_BY_SIZE:
        if params < limit:
            return utilization, label
    raise AssertionError("unreachable: the last size class has no limit")


def compatibility_problem(spec: ModelSpec, gpu: GpuType) -> str | None:
    """Why ``spec`` cannot run on ``gpu`` at all, or ``None`` when it can."""
    quant = spec.quantization
    if gpu.is_cpu:
        if quant is not None and quant.method is not QuantMethod.GGUF:
            return f"cpu: {quant.label} weights need CUDA kernels"
        return None
    if quant is not None and quant.fp8_weights and not gpu.supports_fp8:
        major, minor = gpu.compute_capability
        return f"{gpu.name}: FP8 weights need compute capability 8.9 or later (it has {major}.{minor})"
    return None


def plan(
    model: ModelSpec | str | Path,
    *,
    context_length: int | None = None,
    batch_size: int = 1,
    prefer: Preference | str = Preference.COST,
    allowed_types: Iterable[str] | None = None,
) -> Placement:
    """Choose the GPU type, count and memory utilization for a model.

    Args:
        model: a model name, a model directory or config.json / .gguf path, or a :class:`ModelSpec`.
        context_length: tokens per sequence; ``None`` for :func:`default_context_length`.
        batch_size: sequences served at once (the KV cache scales with it).
        prefer: ``"cost"`` (cheapest per hour) or ``"memory"`` (smallest device).
        allowed_types: catalog types the fleet has (``("cpu",)`` on a CPU-only fleet); ``None`` for every GPU
            type (never ``cpu``).

    Returns:
        The placement; its weights + KV cache + overhead fit in ``memory_utilization`` of its devices.

    Raises:
        ModelSpecError: the model cannot be understood (see :func:`gpufleet.gpu.plan.specs.load_spec`).
        ConfigError: a bad argument (unknown type, non-positive context or batch, unknown preference).
        PlanningError: no allowed type, in any count, can hold or run the model.
    """
    spec = load_spec(model)
    preference = _preference(prefer)
    types = _allowed(allowed_types)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    reasons = list(spec.notes)
    context = _context(spec, context_length, reasons)

    problems = [problem for gpu in types if (problem := compatibility_problem(spec, gpu))]
    runnable = [gpu for gpu in types if compatibility_problem(spec, gpu) is None]
    options: list[_Option] = []
    largest: _Option | None = None  # the biggest option tried, for the error message
    for gpu in runnable:
        for count in (1,) if gpu.is_cpu else GPU_COUNTS:
            estimate = estimate_memory(spec, gpu, context_length=context, batch_size=batch_size, gpu_count=count)
            utilization = _utilization(spec, estimate.total_bytes, gpu.memory_bytes * count, count)
            option = _Option(gpu, count, estimate, utilization or 0.0)
            if largest is None or option.capacity_bytes > largest.capacity_bytes:
                largest = option
            if utilization is not None:
                options.append(option)
                break

    gpu_options = [o for o in options if not o.gpu.is_cpu]
    cpu_options = [o for o in options if o.gpu.is_cpu]
    singles = [o for o in gpu_options if o.count == 1]
    pool = singles or gpu_options or cpu_options
    if not pool:
        raise PlanningError(
            _no_fit_message(
                spec, context=context, batch_size=batch_size, types=types, problems=problems, largest=largest
            )
        )
    pool.sort(key=lambda o: o.key(preference))
    chosen = pool[0]
    fallbacks = [o.gpu.name for o in pool[1:] if o.count == chosen.count]
    if cpu_options and not chosen.gpu.is_cpu:
        fallbacks.append(CPU)

    reasons.extend(problems)
    reasons.extend(_choice_reasons(spec, chosen=chosen, pool=pool, types=types, preference=preference))
    return Placement(
        gpu_type=chosen.gpu.name,
        gpu_count=chosen.count,
        memory_utilization=chosen.utilization,
        params=spec.params,
        weights_bytes=chosen.estimate.weights_bytes,
        kv_cache_bytes=chosen.estimate.kv_cache_bytes,
        overhead_bytes=chosen.estimate.overhead_bytes,
        quantization=spec.quantization.label if spec.quantization else "none",
        is_moe=spec.is_moe,
        fallbacks=tuple(fallbacks),
        reasons=tuple(reasons),
        engine=_engine(spec, chosen, context),
    )


def get_gpu_placement(model_name: str) -> tuple[str, int, float]:
    """``(gpu_type, gpu_count, memory_utilization)`` for a model, with :func:`plan`'s defaults.

    ``gpu_count`` above 1 means tensor parallelism: the model needs a worker spanning that many GPUs of the type,
    each used up to ``memory_utilization``.

    Args:
        model_name: a model name, or a model directory or config.json / .gguf path.

    Returns:
        The chosen type's catalog name, the number of its GPUs, and the fraction of each one the model may use.

    Raises:
        ModelSpecError: the name cannot be understood.
        PlanningError: no GPU type, in any count, can hold the model.
    """
    placement = plan(model_name)
    return placement.gpu_type, placement.gpu_count, placement.memory_utilization


def get_gpu_config(model_name: str) -> tuple[str, float]:
    """``(gpu_type, memory_utilization)`` for a model, with :func:`plan`'s defaults (the two-value form).

    It has no room for the GPU count: for a model that needs several GPUs (a 405B model: 8 x h200) it returns the
    type and a per-GPU utilization, and warns. Use :func:`get_gpu_placement` (or :func:`plan`) to get the count.

    Args:
        model_name: a model name, or a model directory or config.json / .gguf path.

    Returns:
        The chosen type's catalog name and the fraction of each of its GPUs the model may use.

    Warns:
        UserWarning: the model needs more than one GPU, which this result cannot say.

    Raises:
        ModelSpecError: the name cannot be understood.
        PlanningError: no GPU type, in any count, can hold the model.
    """
    gpu_type, gpu_count, utilization = get_gpu_placement(model_name)
    if gpu_count > 1:
        warnings.warn(
            f"get_gpu_config({model_name!r}) returns {gpu_type!r} but the model needs {gpu_count} x {gpu_type} "
            "(tensor parallel); one GPU of that type cannot hold it. Use get_gpu_placement() for the count",
            UserWarning,
            stacklevel=2,
        )
    return gpu_type, utilization


# ------------------------------------------------------------------------------------------------ helpers


def _preference(prefer: Preference | str) -> Preference:
    try:
        return Preference(prefer)
    except ValueError:
        raise ConfigError(
            f"prefer={prefer!r} is not a preference: use {', '.join(repr(p.value) for p in Preference)}"
        ) from None


def _allowed(allowed_types: Iterable[str] | None) -> list[GpuType]:
    if allowed_types is None:
        return list(all_types(include_cpu=False))
    if isinstance(allowed_types, str):
        allowed_types = (allowed_types,)
    names = {get_gpu_type(name).name for name in allowed_types}
    if not names:
        raise ConfigError("allowed_types is empty: pass the GPU types the fleet has, or None for all of them")
    return [gpu for gpu in all_types() if gpu.name in names]


def _context(spec: ModelSpec, context_length: int | None, reasons: list[str]) -> int:
    if context_length is None:
        context = default_context_length(spec)
        if spec.max_position_embeddings:
            reasons.append(
                f"context {context} tokens: the model's maximum ({spec.max_position_embeddings}) capped at "
                f"{MAX_DEFAULT_CONTEXT_LENGTH}; pass context_length for more"
            )
        else:
            reasons.append(f"context {context} tokens: the default when the model's maximum is unknown")
        return context
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length <= 0:
        raise ConfigError(f"context_length must be a positive integer, got {context_length!r}")
    if spec.max_position_embeddings and context_length > spec.max_position_embeddings:
        reasons.append(
            f"context {context_length} exceeds the model's maximum of {spec.max_position_embeddings} tokens: "
            "planned as asked, but the model may not handle it"
        )
    return context_length


def _utilization(spec: ModelSpec, need_bytes: int, capacity_bytes: int, count: int) -> float | None:
    """The utilization to run at, or ``None`` when even the maximum is not enough."""
    needed_pct = -(-need_bytes * 100 // capacity_bytes)  # ceiling, in whole percent, exact in integers
    max_pct = round(MAX_MEMORY_UTILIZATION * 100)
    if needed_pct > max_pct:
        return None
    base, _ = base_utilization(spec.params, count)
    pct = max(round(base * 100), needed_pct)
    # Guard the float product the callers check (utilization * capacity >= need) against rounding.
    while pct / 100 * capacity_bytes < need_bytes:
        pct += 1
    return pct / 100 if pct <= max_pct else None


def _choice_reasons(
    spec: ModelSpec,
    *,
    chosen: _Option,
    pool: list[_Option],
    types: list[GpuType],
    preference: Preference,
) -> list[str]:
    est = chosen.estimate
    gpu = chosen.gpu
    reasons = [
        f"needs {fmt_bytes(est.total_bytes)}: weights {fmt_bytes(est.weights_bytes)} ({est.dtype}"
        + (f", {spec.quantization.label}" if spec.quantization else "")
        + f"), KV cache {fmt_bytes(est.kv_cache_bytes)} ({est.kv_cache_dtype}), activations "
        f"{fmt_bytes(est.activation_bytes)}, runtime {fmt_bytes(est.runtime_bytes)}"
    ]
    if spec.dtype == "bfloat16" and est.dtype == "float16":
        major, minor = gpu.compute_capability
        reasons.append(f"{gpu.name} has no bf16 (compute capability {major}.{minor}): served in float16")
    measure = "cheapest per hour" if preference is Preference.COST else "smallest memory"
    if gpu.is_cpu:
        only_cpu = all(t.is_cpu for t in types)
        reasons.append(
            "cpu chosen: it is the only allowed type"
            if only_cpu
            else "cpu chosen: no allowed GPU type can hold or run the model"
        )
    elif chosen.count == 1:
        reasons.append(f"{gpu.name}: the {measure} of {len(pool)} allowed GPU type(s) that fit on one device")
    else:
        reasons.append(
            f"no single allowed GPU fits: {chosen.count} x {gpu.name} with tensor parallelism, the {measure} of "
            f"{len(pool)} multi-GPU option(s); it needs a worker spanning {chosen.count} GPUs"
        )
    if not gpu.is_cpu and any(t.is_cpu for t in types):
        reasons.append("cpu allowed but not chosen: a GPU type fits")
    base, label = base_utilization(spec.params, chosen.count)
    budget = fmt_bytes(chosen.utilization * chosen.capacity_bytes)
    if chosen.utilization > base:
        reasons.append(
            f"memory utilization {chosen.utilization:.2f} ({budget}): raised from {base:.2f} ({label}) so the "
            "model fits"
        )
    else:
        reasons.append(f"memory utilization {chosen.utilization:.2f} ({budget}): default for a {label}")
    if est.kv_cache_dtype == "fp8":
        reasons.append(f"KV cache in fp8 on {gpu.name} (Hopper or later): half the 16-bit size")
    return reasons


def _engine(spec: ModelSpec, chosen: _Option, context: int) -> EngineSettings:
    decoder = not spec.is_encoder
    return EngineSettings(
        gpu_memory_utilization=chosen.utilization,
        tensor_parallel_size=chosen.count,
        dtype=chosen.estimate.dtype,
        kv_cache_dtype="fp8" if chosen.estimate.kv_cache_dtype == "fp8" else "auto",
        max_model_len=context,
        enable_chunked_prefill=decoder and not chosen.gpu.is_cpu,
        enable_prefix_caching=decoder,
        block_size=16,
        quantization=spec.quantization.engine_name if spec.quantization else None,
        # Expandable segments let the allocator grow blocks in place: far less fragmentation when models of
        # different sizes come and go on one device.
        pytorch_cuda_alloc_conf=None if chosen.gpu.is_cpu else "expandable_segments:True",
    )


def _no_fit_message(
    spec: ModelSpec,
    *,
    context: int,
    batch_size: int,
    types: list[GpuType],
    problems: list[str],
    largest: _Option | None,
) -> str:
    allowed = ", ".join(t.name for t in types)
    if largest is None:
        return (
            f"model {spec.name!r} cannot run on any allowed type ({allowed}): {'; '.join(problems)}; allow a type "
            "that supports it or use another variant of the model"
        )
    # In GiB with one decimal whatever the size: fmt_bytes would show "1.3 TiB needs, 1.3 TiB holds".
    need_gib = largest.estimate.total_bytes / GiB
    budget_gib = MAX_MEMORY_UTILIZATION * largest.capacity_bytes / GiB
    count = f"{largest.count} x " if largest.count > 1 else ""
    return (
        f"model {spec.name!r} needs {need_gib:,.1f} GiB at context {context} x batch {batch_size} on the largest "
        f"allowed option, {count}{largest.gpu.name}, which holds {budget_gib:,.1f} GiB at utilization "
        f"{MAX_MEMORY_UTILIZATION:.2f} (allowed: {allowed}): use a quantized variant, a shorter context or a "
        "smaller batch, or allow bigger GPU types"
    )
