"""Human rendering of a :class:`~gpufleet.gpu.plan.selection.Placement`: the table ``gpufleet plan`` prints.

Plain text, no colour, no third-party table library: it goes to terminals, logs and issue comments alike.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpufleet.gpu.plan.catalog import get_gpu_type
from gpufleet.gpu.plan.selection import Placement
from gpufleet.gpu.units import fmt_bytes


def _params(params: int) -> str:
    if params >= 1e9:
        return f"{params / 1e9:.2f} B"
    return f"{params / 1e6:.1f} M"


def placement_rows(placement: Placement, extra_rows: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """The (label, value) rows of the table, in display order; ``extra_rows`` (the caller's) follow the GPU row."""
    gpu = get_gpu_type(placement.gpu_type)
    capacity = gpu.memory_bytes * placement.gpu_count
    budget = placement.memory_utilization * capacity
    device = f"{placement.gpu_count} x {gpu.name}" if placement.gpu_count > 1 else gpu.name
    engine = placement.engine
    return [
        ("GPU", f"{device} ({gpu.description}, {fmt_bytes(gpu.memory_bytes)} each)"),
        *extra_rows,
        ("memory utilization", f"{placement.memory_utilization:.2f} -> budget {fmt_bytes(budget)}"),
        ("parameters", _params(placement.params) + (" (MoE)" if placement.is_moe else "")),
        ("quantization", placement.quantization),
        ("weights", fmt_bytes(placement.weights_bytes)),
        ("KV cache", fmt_bytes(placement.kv_cache_bytes)),
        ("overhead", fmt_bytes(placement.overhead_bytes)),
        ("total", f"{fmt_bytes(placement.total_bytes)} of {fmt_bytes(budget)}"),
        ("price", f"${gpu.price_per_hour_usd * placement.gpu_count:.2f}/h (approximate list price)"),
        ("fallbacks", ", ".join(placement.fallbacks) or "-"),
        (
            "engine",
            f"dtype={engine.dtype} kv_cache_dtype={engine.kv_cache_dtype} max_model_len={engine.max_model_len} "
            f"tp={engine.tensor_parallel_size} block_size={engine.block_size}",
        ),
        (
            "",
            f"chunked_prefill={engine.enable_chunked_prefill} prefix_caching={engine.enable_prefix_caching} "
            f"quantization={engine.quantization or '-'}",
        ),
        ("", f"PYTORCH_CUDA_ALLOC_CONF={engine.pytorch_cuda_alloc_conf or '-'}"),
    ]


def render_placement(
    placement: Placement, *, model: str | None = None, extra_rows: Sequence[tuple[str, str]] = ()
) -> str:
    """A two-column table of the placement followed by its reasons, as one string without a trailing newline.

    Args:
        placement: what :func:`gpufleet.gpu.plan.selection.plan` returned.
        model: the model as the user named it, for the title line; ``None`` for no title.
        extra_rows: ``(label, value)`` rows the caller adds after the GPU row (the CLI adds the queue).

    Returns:
        The table and the reasons, one line each.
    """
    rows = placement_rows(placement, extra_rows)
    width = max(len(label) for label, _ in rows)
    lines = [f"plan for {model}"] if model else []
    lines.extend(f"  {label:<{width}}  {value}" for label, value in rows)
    lines.append("  why:")
    lines.extend(f"    - {reason}" for reason in placement.reasons)
    return "\n".join(lines)
