"""The producer-side router: a pure planning function behind a thin Celery router adapter.

``FleetRouter`` is listed in ``task_routes``; Celery calls it for every job sent. It plans the job's model onto the
cheapest GPU type of the fleet that can hold it (``gpu.plan.selection.plan``, from the model's config.json under the
model root when the producer can see it, else from its name) and returns that type's queue. An explicit
``queue=`` on the call always wins.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from gpu.errors import GpuError, UnsafeModelIdError
from gpu.plan.selection import Placement, plan
from gpu.repository import validate_model_id
from tasks.errors import RoutingError
from tasks.names import gpu_type_queue
from tasks.settings import Settings, get_settings


@functools.lru_cache(maxsize=1024)
def _plan_cached(model: str, model_root: Path | None, gpu_types: tuple[str, ...]) -> Placement:
    target: str | Path = model
    if model_root is not None and (model_root / model / "config.json").is_file():
        target = model_root / model
    return plan(target, allowed_types=gpu_types or None)


def placement_for(model: str, settings: Settings | None = None) -> Placement:
    """The fleet placement of ``model`` (cached per model).

    Raises:
        RoutingError: the model cannot be planned onto any GPU type of the fleet.
    """
    settings = settings or get_settings()
    try:
        validate_model_id(model)
    except UnsafeModelIdError as exc:
        raise RoutingError(str(exc)) from None
    try:
        return _plan_cached(model, settings.model_root, settings.fleet.gpu_types)
    except GpuError as exc:
        fleet = ", ".join(settings.fleet.gpu_types) or "every catalog GPU type"
        raise RoutingError(
            f"cannot route a job for {model!r} (fleet: {fleet}): {exc}. Set GPUFLEET_FLEET__GPU_TYPES to the "
            "types your workers run on, or pass queue=... explicitly"
        ) from exc


def queue_for_model(model: str, settings: Settings | None = None) -> str:
    """The queue a job for ``model`` goes to."""
    placement = placement_for(model, settings)
    return placement.queue or gpu_type_queue(placement.gpu_type)


def next_fallback_queue(model: str, current_gpu_type: str, settings: Settings | None = None) -> str | None:
    """Where to re-send a job that ran out of memory on ``current_gpu_type``: the first type of the model's plan
    (primary, then fallbacks) with more memory; from ``cpu``, the first GPU type of the plan. None if none is left.
    """
    from gpu.plan.catalog import get_gpu_type

    try:
        placement = placement_for(model, settings)
        current = get_gpu_type(current_gpu_type)
    except (RoutingError, GpuError):
        return None
    for name in (placement.gpu_type, *placement.fallbacks):
        candidate = get_gpu_type(name)
        if candidate.is_cpu or candidate.name == current.name:
            continue
        if current.is_cpu or candidate.memory_bytes > current.memory_bytes:
            return candidate.queue
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
