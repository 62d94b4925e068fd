"""Producer-side planning by GPU type: which GPU type's queue a model goes to without the live fleet.

The model is planned (``gpufleet.gpu.plan.selection.plan``) from its config.json when the producer sees the model root
(or an offline Hugging Face cache), else from its name, over the GPU types of ``GPUFLEET_FLEET__GPU_TYPES``. Used by
the live router for each live type, by the fallback when no registry answers, by ``gpufleet plan`` and by the OOM
policy's re-route (:func:`next_fallback_queue`).
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

from gpufleet.gpu.errors import GpuError, ModelNotInstalledError, ModelSpecError, UnsafeModelIdError
from gpufleet.gpu.plan.catalog import get_gpu_type
from gpufleet.gpu.plan.selection import Placement, Preference, plan
from gpufleet.gpu.repository import resolve_model, validate_model_id
from gpufleet.tasks.errors import ModelNotFoundError, RoutingError
from gpufleet.tasks.names import gpu_type_queue
from gpufleet.tasks.settings import Settings, get_settings

log = logging.getLogger(__name__)


def fleet_gpu_types(settings: Settings) -> tuple[str, ...] | None:
    """The GPU types the router plans onto: ``GPUFLEET_FLEET__GPU_TYPES``, or ``None`` for every catalog GPU type."""
    return settings.fleet.gpu_types or None


TARGET_CACHE_S = 5.0
"""How long a model's resolved directory is reused: resolving stats the model root (two thirds of a routing
decision otherwise); a model copied into the root is seen within this long. Misses are never cached."""

_targets: dict[tuple[str, Path | None, Path | None], tuple[float, str | Path]] = {}


def plan_target(model: str, settings: Settings) -> str | Path:
    """What to plan ``model`` from: its installed directory when the producer can see it, else its name.

    Raises:
        RoutingError: the id is malformed or escapes the model root.
        ModelNotFoundError: the producer sees the model root, and neither it nor the HF cache holds the model.
    """
    key = (model, settings.model_root, settings.hf_cache)
    now = time.monotonic()
    cached = _targets.get(key)
    if cached is not None and now - cached[0] < TARGET_CACHE_S:
        return cached[1]
    target = _resolve_target(model, settings)
    if len(_targets) >= 4096:
        _targets.clear()  # a bound, not an LRU: producers route a handful of models
    _targets[key] = (now, target)
    return target


def _resolve_target(model: str, settings: Settings) -> str | Path:
    root = settings.model_root
    if root is None or not root.is_dir():
        return model  # a producer without the workers' storage plans from the name
    hf_cache = settings.hf_cache_dir
    try:
        return resolve_model(model, root, hf_cache).path
    except UnsafeModelIdError as exc:
        raise RoutingError(str(exc)) from None
    except ModelNotInstalledError:
        raise ModelNotFoundError(
            f"model {model!r} is not installed: {root / model} has no config.json and the Hugging Face cache "
            f"{hf_cache} has no snapshot of it. Copy the model directory to {root / model} "
            f"(`gpufleet models make-demo {root}` creates the demo models)"
        ) from None


@functools.lru_cache(maxsize=1024)
def plan_cached(
    target: str | Path,
    gpu_types: tuple[str, ...] | None,
    context_length: int | None,
    batch_size: int,
    prefer: str,
) -> Placement:
    return plan(target, context_length=context_length, batch_size=batch_size, prefer=prefer, allowed_types=gpu_types)


def placement_for(
    model: str,
    settings: Settings | None = None,
    *,
    context_length: int | None = None,
    batch_size: int = 1,
    prefer: Preference | str = Preference.COST,
    all_types: bool = False,
) -> Placement:
    """The placement of ``model`` on the fleet, as the router decides it (cached per model and arguments).

    Args:
        model: a model id (``org/name``).
        settings: default :func:`get_settings`.
        context_length: tokens per sequence; ``None`` for the planner's default (what the router uses).
        batch_size: sequences served at once (the router plans for 1).
        prefer: ``"cost"`` (what the router uses) or ``"memory"``.
        all_types: plan over the whole catalog instead of ``GPUFLEET_FLEET__GPU_TYPES``.

    Returns:
        The placement.

    Raises:
        RoutingError: the id is malformed, or the model cannot be planned onto any GPU type of the fleet.
        ModelNotFoundError: the producer sees the model root and the model is not installed there.
    """
    settings = settings or get_settings()
    try:
        validate_model_id(model)
    except UnsafeModelIdError as exc:
        raise RoutingError(str(exc)) from None
    target = plan_target(model, settings)
    gpu_types = None if all_types else fleet_gpu_types(settings)
    try:
        return plan_cached(target, gpu_types, context_length, batch_size, Preference(prefer).value)
    except ValueError:
        raise RoutingError(f"prefer={prefer!r} is not a preference: use 'cost' or 'memory'") from None
    except ModelSpecError as exc:
        raise not_understood(model, exc) from exc
    except GpuError as exc:
        fleet = ", ".join(gpu_types or ()) or "every catalog GPU type"
        raise RoutingError(
            f"cannot route a job for {model!r} (fleet: {fleet}): {exc}. Set GPUFLEET_FLEET__GPU_TYPES to the "
            "types your workers run on, or pass queue=... explicitly"
        ) from exc


def not_understood(model: str, exc: Exception) -> RoutingError:
    return RoutingError(
        f"cannot route a job for {model!r}: {exc}. Install it under GPUFLEET_MODEL_ROOT (planned from its "
        "config.json then), or pass queue=... explicitly"
    )


def queue_for_model(model: str, settings: Settings | None = None) -> str:
    """The queue a job for ``model`` goes to.

    Raises:
        RoutingError: see :func:`placement_for`.
        ModelNotFoundError: see :func:`placement_for`.
    """
    return gpu_type_queue(placement_for(model, settings).gpu_type)


def next_fallback_queue(model: str, current_gpu_type: str, settings: Settings | None = None) -> str | None:
    """Where to re-send a job that ran out of memory on ``current_gpu_type``: the first type of the model's plan
    (primary, then fallbacks) with more memory; from ``cpu``, the first GPU type of the plan. None if none is left.
    """
    try:
        placement = placement_for(model, settings)
        current = get_gpu_type(current_gpu_type)
    except (RoutingError, ModelNotFoundError, GpuError):
        return None
    for name in (placement.gpu_type, *placement.fallbacks):
        candidate = get_gpu_type(name)
        if candidate.is_cpu or candidate.name == current.name:
            continue
        if current.is_cpu or candidate.memory_bytes > current.memory_bytes:
            return gpu_type_queue(candidate.name)
    return None
