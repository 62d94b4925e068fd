"""Where a job this worker gives away goes: the live fleet's choice, without this worker.

A worker gives a job away in two cases, both decided by the rule every producer routes with
(:func:`gpufleet.tasks.live_routing.route_elsewhere`, over the registry the worker's own app reads), so a job never
lands on a queue nobody consumes:

* **out of memory** after the OOM policy's retry (:func:`after_oom`): a live worker other than this one, with more
  memory, that can hold the model. None: the policy fails the job with a ``CapacityError`` saying so. Only without
  a registry (``GPUFLEET_FLEET__LIVE_ROUTING=false``, no Redis, the registry down) does it fall back to the next
  GPU type of the model's plan (:func:`gpufleet.tasks.planning.next_fallback_queue`): nobody can tell then who
  consumes what;
* **a model this worker's budget cannot hold**, for a job it took from a shared queue, before any device work
  (:func:`forward`): forwarded once, marked with :data:`~gpufleet.tasks.names.FORWARDED_HEADER` so it never loops,
  to where the router sends it without this worker. Nothing live can hold it: the job fails.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpufleet.gpu.units import fmt_bytes
from gpufleet.tasks.errors import FleetError
from gpufleet.tasks.fleet import FleetSnapshot
from gpufleet.tasks.live_routing import route_elsewhere
from gpufleet.tasks.names import FLEET_QUEUE, FORWARDED_HEADER
from gpufleet.tasks.planning import next_fallback_queue
from gpufleet.tasks.routing import LiveRouter, app_router

if TYPE_CHECKING:
    from gpufleet.tasks.settings import Settings
    from gpufleet.workers.child.runtime import WorkerRuntime
    from gpufleet.workers.common.jobs import JobPayload

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Onward:
    """Where a job goes next (``queue``) and why; or, without a queue, why nothing can take it."""

    queue: str | None
    reason: str


_routers: dict[int, LiveRouter] = {}


def live_fleet(app: Any, settings: Settings) -> FleetSnapshot | None:
    """The live fleet as the producers see it (the app's router and its registry cache), or None without one."""
    router = app_router(app)
    if router is None:  # an app built without gpufleet's routes (tests): one router per settings object
        router = _routers.setdefault(id(settings), LiveRouter(settings))
    return router.fleet()


def own_memory_bytes(runtime: WorkerRuntime) -> int:
    """What this worker may fill with models: its budget (its device memory before the runtime started)."""
    return runtime.pool.budget_bytes if runtime.pool is not None else runtime.identity.memory_bytes


def after_oom(app: Any, runtime: WorkerRuntime, model: str) -> Onward:
    """Where a job still out of memory after the retry goes: a live worker with more memory (see module doc)."""
    settings, name = runtime.settings, runtime.identity.name
    fleet = live_fleet(app, settings)
    if fleet is None:
        queue = next_fallback_queue(model, runtime.identity.gpu_type, settings)
        if queue is None:
            return Onward(None, "no larger GPU type is left to try (no fleet registry to find a live worker in)")
        return Onward(queue, f"out of memory on {name}; no fleet registry, so the plan's next larger GPU type")
    ours = own_memory_bytes(runtime)
    try:
        decision = route_elsewhere(
            model, fleet, settings, leaving=name, leaving_queue=runtime.identity.queues[0], more_memory_than=ours
        )
    except FleetError as exc:  # RoutingError (nothing larger is live), ModelNotFoundError
        return Onward(None, str(exc))
    return Onward(decision.queue, f"out of memory on {name} ({fmt_bytes(ours)}); {decision.reason}")


def may_forward(payload: JobPayload, type_queue: str) -> bool:
    """Whether a job is one to forward when this worker cannot hold its model: it came from a shared queue (any
    worker of the type could have taken it) and was not forwarded before."""
    info = payload.request_dict.get("delivery_info") or {}
    came_from = info.get("routing_key") if isinstance(info, dict) else None
    return came_from in (type_queue, FLEET_QUEUE) and not payload.header(FORWARDED_HEADER)


def forward(app: Any, runtime: WorkerRuntime, model: str) -> Onward:
    """Where a job for a model this worker's budget cannot hold goes: the router's choice without this worker."""
    settings, name = runtime.settings, runtime.identity.name
    fleet = live_fleet(app, settings)
    if fleet is None:
        return Onward(None, "there is no fleet registry to find another worker in")
    try:
        decision = route_elsewhere(model, fleet, settings, leaving=name, leaving_queue=runtime.identity.queues[0])
    except FleetError as exc:
        return Onward(None, str(exc))
    return Onward(decision.queue, f"{name} cannot hold it ({fmt_bytes(own_memory_bytes(runtime))}); {decision.reason}")
