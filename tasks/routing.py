"""The producer-side router: a pure planning function behind a thin Celery router adapter.

``FleetRouter`` is listed in ``task_routes``; Celery calls it for every job sent. It plans the job's model onto the
cheapest GPU type of the fleet (``GPUFLEET_FLEET__GPU_TYPES``) that can hold it (``gpu.plan.selection.plan``, from
the model's config.json when the producer can see the model root, else from its name) and returns that type's
queue. An explicit ``queue=`` on the call always wins. ``gpufleet plan`` calls :func:`placement_for` too, so it
names the GPU type the router would.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from gpu.errors import GpuError, ModelSpecError, UnsafeModelIdError
from gpu.errors import ModelNotFoundError as GpuModelNotFoundError
from gpu.plan.catalog import get_gpu_type
from gpu.plan.selection import Placement, Preference, plan
from gpu.repository import default_hf_cache, resolve_model, validate_model_id
from tasks.errors import ModelNotFoundError, RoutingError
from tasks.names import gpu_type_queue
from tasks.settings import Settings, get_settings


def fleet_gpu_types(settings: Settings) -> tuple[str, ...] | None:
    """The GPU types the router plans onto: ``GPUFLEET_FLEET__GPU_TYPES``, or ``None`` for every catalog GPU type."""
    return settings.fleet.gpu_types or None


def plan_target(model: str, settings: Settings) -> str | Path:
    """What to plan ``model`` from: its installed directory when the producer can see it, else its name.

    Raises:
        RoutingError: the id is malformed or escapes the model root.
        ModelNotFoundError: the producer sees the model root, and neither it nor the HF cache holds the model.
    """
    root = settings.model_root
    if root is None or not root.is_dir():
        return model  # a producer without the workers' storage plans from the name
    hf_cache = settings.hf_cache or default_hf_cache()
    try:
        return resolve_model(model, root, hf_cache).path
    except UnsafeModelIdError as exc:
        raise RoutingError(str(exc)) from None
    except GpuModelNotFoundError:
        raise ModelNotFoundError(
            f"model {model!r} is not installed: {root / model} has no config.json and the Hugging Face cache "
            f"{hf_cache} has no snapshot of it. Copy the model directory to {root / model} "
            f"(`gpufleet models make-demo {root}` creates the demo models), then send the job again"
        ) from None


@functools.lru_cache(maxsize=1024)
def _plan_cached(
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
        return _plan_cached(target, gpu_types, context_length, batch_size, Preference(prefer).value)
    except ValueError:
        raise RoutingError(f"prefer={prefer!r} is not a preference: use 'cost' or 'memory'") from None
    except ModelSpecError as exc:
        raise RoutingError(
            f"cannot route a job for {model!r}: {exc}. Install it under GPUFLEET_MODEL_ROOT (planned from its "
            "config.json then), or pass queue=... explicitly"
        ) from exc
    except GpuError as exc:
        fleet = ", ".join(gpu_types or ()) or "every catalog GPU type"
        raise RoutingError(
            f"cannot route a job for {model!r} (fleet: {fleet}): {exc}. Set GPUFLEET_FLEET__GPU_TYPES to the "
            "types your workers run on, or pass queue=... explicitly"
        ) from exc


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


class FleetRouter:
    """Celery router bound to one app's settings: ``{"queue": ...}`` for jobs that name a model.

    Jobs without a model (or with an explicit ``queue=``) are left to Celery; a worker refuses a malformed
    request with a clear error.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def __call__(
        self, name: str, args: Any, kwargs: Any, options: dict[str, Any], task: Any = None, **_: Any
    ) -> dict[str, str] | None:
        if options.get("queue") or not name.startswith("fleet."):
            return None
        model = kwargs.get("model") if isinstance(kwargs, dict) else None
        if not isinstance(model, str) or not model:
            return None
        return {"queue": queue_for_model(model, self.settings)}
