"""Routing on the live fleet: pure functions over a :class:`gpufleet.tasks.fleet.FleetSnapshot` (no I/O, no clock).

The rule (:func:`route_live`):

1. plan the model onto each GPU type that has a live worker (:mod:`gpufleet.tasks.planning`), cheapest first as the
   planner orders them (one device before several, the CPU last);
2. keep the workers of those types that can hold it: enough GPUs, and a budget the weights fit in once unpinned
   models are evicted;
3. prefer a ready worker already holding it (resident, then parked) unless more than
   ``GPUFLEET_FLEET__MAX_BACKLOG`` jobs wait on it: its direct queue;
4. else the first such type's queue (a worker still warming up takes it once warm); nothing live can run it:
   :class:`~gpufleet.tasks.errors.RoutingError` at once, naming what the model needs and what is live.

A worker stopping gracefully (``draining``) is never a target. A worker that gives a job away (out of memory, or
a model its budget cannot hold) asks the same rule without itself: :func:`route_elsewhere`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gpufleet.gpu.errors import GpuError, ModelSpecError, UnsafeModelIdError
from gpufleet.gpu.plan.catalog import CPU, get_gpu_type
from gpufleet.gpu.plan.selection import plan
from gpufleet.gpu.repository import validate_model_id
from gpufleet.gpu.units import fmt_bytes
from gpufleet.tasks.errors import ModelNotFoundError, RoutingError
from gpufleet.tasks.fleet import FleetSnapshot, Holding, WorkerRecord
from gpufleet.tasks.names import gpu_type_queue
from gpufleet.tasks.planning import fleet_gpu_types, not_understood, placement_for, plan_target
from gpufleet.tasks.settings import Settings

log = logging.getLogger(__name__)


MAX_WORKERS_SHOWN = 8
"""Workers listed in an error message; the rest are counted."""


@dataclass(frozen=True)
class ModelNeed:
    """What a model needs on one GPU type, as the planner sizes it there.

    Attributes:
        gpu_type: catalog name (``h100``, ``cpu``).
        gpu_count: devices one worker must span (tensor parallel above 1).
        weights_bytes: the weights as served on that type: what a worker's budget reserves before loading.
        total_bytes: weights, KV cache and overhead (shown to people; worker budgets count weights).
    """

    gpu_type: str
    gpu_count: int
    weights_bytes: int
    total_bytes: int

    def describe(self) -> str:
        """``2 x h100 (140.0 GiB of weights)``: the need on its own, as in "it needs ..."."""
        count = f"{self.gpu_count} x " if self.gpu_count > 1 else ""
        return f"{count}{self.gpu_type} ({fmt_bytes(self.weights_bytes)} of weights)"

    def sized(self) -> str:
        """``86.6 MiB of weights``, or ``140.0 GiB of weights over 2 x h100``: what follows the model's name in
        "can hold <model> (...)", where the queue or worker already names the type."""
        over = f" over {self.gpu_count} x {self.gpu_type}" if self.gpu_count > 1 else ""
        return f"{fmt_bytes(self.weights_bytes)} of weights{over}"

    def start_command(self) -> str:
        """The worker to start for this need: ``--cpu`` only for a CPU need, ``--gpus`` for several GPUs."""
        if get_gpu_type(self.gpu_type).is_cpu:
            return "`gpufleet worker --cpu`"
        if self.gpu_count > 1:
            gpus = ",".join(str(index) for index in range(self.gpu_count))
            return f"`gpufleet worker --gpus {gpus}` over {self.gpu_count} {self.gpu_type} GPUs"
        return f"`gpufleet worker --gpu N` on a {self.gpu_type} GPU"


@dataclass(frozen=True)
class RouteDecision:
    """Where one job goes, and why.

    Attributes:
        queue: the queue the job is sent to.
        worker: the worker whose direct queue that is; ``None`` for a shared queue.
        reason: why, for a person.
        gpu_type: the GPU type it will run on; ``None`` when not known (an explicit queue).
        holding: ``"resident"`` or ``"parked"`` when the chosen worker already holds the model.
        live: decided on the live fleet; ``False`` when decided by GPU type alone (or by an explicit queue).
    """

    queue: str
    worker: str | None
    reason: str
    gpu_type: str | None = None
    holding: Holding | None = None
    live: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The decision as a JSON-ready dict."""
        return asdict(self)


@functools.lru_cache(maxsize=256)
def _catalog_name(gpu_type: str) -> str:
    try:
        return get_gpu_type(gpu_type).name
    except GpuError:
        return gpu_type.lower()  # not in this producer's catalog: no plan will name it, so nothing routes to it


@functools.lru_cache(maxsize=4096)
def _need_cached(target: str | Path, gpu_type: str) -> ModelNeed | str:
    """The need on one type, or why that type cannot run the model: refusals are cached too, since a refused
    plan costs as much as an accepted one and would otherwise be recomputed for every job."""
    try:
        placement = plan(target, allowed_types=(gpu_type,))
    except ModelSpecError:
        raise
    except GpuError as exc:
        return str(exc)
    return ModelNeed(placement.gpu_type, placement.gpu_count, placement.weights_bytes, placement.total_bytes)


def _need_order(need: ModelNeed) -> tuple[bool, bool, float, int, str]:
    # The planner's own order: one device before several, the cheapest per hour first, the CPU last.
    gpu = get_gpu_type(need.gpu_type)
    return (gpu.is_cpu, need.gpu_count > 1, gpu.price_per_hour_usd * need.gpu_count, gpu.memory_bytes, gpu.name)


def model_needs(
    model: str, gpu_types: Sequence[str], settings: Settings
) -> tuple[tuple[ModelNeed, ...], tuple[str, ...]]:
    """What ``model`` needs on each of ``gpu_types``, in order of preference, and why the others cannot run it.

    Each type is planned alone (cached per model and type), so a type whose workers span several GPUs is sized
    for the count it needs there, not dropped because another type fits on one device.

    Args:
        model: a model id (``org/name``).
        gpu_types: catalog names, typically the live fleet's (:func:`live_gpu_types`).
        settings: where the producer sees models (``GPUFLEET_MODEL_ROOT``).

    Returns:
        ``(needs, refusals)``: the types that can run the model, cheapest first (one device before several, the
        CPU last); and one line per type that cannot.

    Raises:
        RoutingError: the id is malformed, or the model cannot be understood from its config or name.
        ModelNotFoundError: the producer sees the model root and the model is not installed.
    """
    try:
        validate_model_id(model)
    except UnsafeModelIdError as exc:
        raise RoutingError(str(exc)) from None
    target = plan_target(model, settings)
    needs: list[ModelNeed] = []
    refusals: list[str] = []
    for gpu_type in gpu_types:
        try:
            result = _need_cached(target, gpu_type)
        except ModelSpecError as exc:
            raise not_understood(model, exc) from exc
        if isinstance(result, str):
            refusals.append(result)
        else:
            needs.append(result)
    needs.sort(key=_need_order)
    return tuple(needs), tuple(refusals)


def live_gpu_types(fleet: FleetSnapshot, settings: Settings) -> tuple[str, ...]:
    """The GPU types of the fleet's live workers, within ``GPUFLEET_FLEET__GPU_TYPES`` when that is set."""
    types = sorted({_catalog_name(worker.gpu_type) for worker in fleet.routable()})
    allowed = fleet_gpu_types(settings)
    if allowed is None:
        return tuple(types)
    names = {_catalog_name(name) for name in allowed}
    return tuple(name for name in types if name in names)


def can_hold(worker: WorkerRecord, need: ModelNeed, model: str) -> bool:
    """Whether ``worker`` can run ``model`` as ``need`` sizes it: its type, enough GPUs, and a budget the weights
    fit in once every unpinned model is evicted. A worker already holding it on its device can; a budget of 0
    means the worker did not report one, and only the GPU type and count are checked."""
    if _catalog_name(worker.gpu_type) != need.gpu_type or worker.gpu_count < need.gpu_count:
        return False
    if worker.memory_budget_bytes == 0 or worker.holds(model) == "resident":
        return True
    pinned_bytes = sum(held.bytes for held in worker.resident if held.pinned)
    return need.weights_bytes <= worker.memory_budget_bytes - pinned_bytes


def route_on_fleet(
    model: str,
    needs: Sequence[ModelNeed],
    fleet: FleetSnapshot,
    *,
    max_backlog: int,
    refusals: Sequence[str] = (),
    suggested: Sequence[ModelNeed] = (),
) -> RouteDecision:
    """Route one job for ``model`` on the live fleet: the pure heart of live routing (no I/O, no clock).

    Args:
        model: the model id.
        needs: what it needs per GPU type, in order of preference (:func:`model_needs`).
        fleet: the live fleet; ready workers first, warming ones when no ready one can (one past its TTL or
            draining never).
        max_backlog: a worker holding the model is preferred while at most this many jobs wait on it.
        refusals: why other types cannot run the model, for the error message.
        suggested: when no live type can run the model, the needs on types that could (what to start), for the
            error message.

    Returns:
        The decision: a holder's direct queue (resident before parked, the preferred type first, then the
        shortest backlog); else the first able type's shared queue; or, when some workers consuming that queue
        cannot hold the model (too few GPUs, too small a budget), the least busy able worker's direct queue.

    Raises:
        RoutingError: no ready worker can run the model; the message names what it needs and what is live.
    """
    live_able = [
        (rank, need, worker)
        for rank, need in enumerate(needs)
        for worker in fleet.routable()
        if can_hold(worker, need, model)
    ]
    able = [entry for entry in live_able if entry[2].ready]
    if not able and live_able:
        # Only workers still warming up can run it (a deploy, a restart): queue it for them rather than fail.
        _, need, worker = live_able[0]
        sharing = [w for w in fleet.routable() if w.type_queue == worker.type_queue]
        shared = all(can_hold(w, need, model) for w in sharing)
        return RouteDecision(
            queue=worker.type_queue if shared else worker.direct_queue,
            worker=None if shared else worker.name,
            reason=f"no ready worker can run it yet: {worker.name} is warming up; it can hold {model!r} "
            f"({need.sized()}) and takes the job once warm",
            gpu_type=need.gpu_type,
        )
    if not able:
        raise RoutingError(_nothing_can_run(model, needs, refusals, fleet, suggested))
    over_bound: list[str] = []
    for holding in ("resident", "parked"):
        holders = [entry for entry in able if entry[2].holds(model) == holding]
        within = [entry for entry in holders if entry[2].backlog <= max_backlog]
        over_bound += [f"{w.name} ({holding}, backlog {w.backlog})" for _, _, w in holders if w.backlog > max_backlog]
        if within:
            _, need, worker = min(within, key=lambda entry: (entry[0], entry[2].backlog, entry[2].name))
            return RouteDecision(
                queue=worker.direct_queue,
                worker=worker.name,
                reason=f"{holding} on {worker.name} (backlog {worker.backlog} <= {max_backlog}): no load from disk"
                if holding == "resident"
                else f"parked on {worker.name} (backlog {worker.backlog} <= {max_backlog}): one host-to-device copy",
                gpu_type=need.gpu_type,
                holding=worker.holds(model),
            )
    first_rank, need, _ = able[0]
    chosen = [worker for rank, _, worker in able if rank == first_rank]
    queue = chosen[0].type_queue
    # Any live worker on the shared queue may take the job (a warming one too, once warm), so it is safe only
    # when every one of them can hold the model; else the job goes to one that can, directly.
    sharing = [worker for worker in fleet.routable() if worker.type_queue == queue]
    busy = f"; held by {', '.join(over_bound)}, over the backlog bound {max_backlog}" if over_bound else ""
    if all(can_hold(worker, need, model) for worker in sharing):
        return RouteDecision(
            queue=queue,
            worker=None,
            reason=f"no ready worker holds it{busy}: {len(chosen)} ready worker(s) on {queue} can hold {model!r} "
            f"({need.sized()})",
            gpu_type=need.gpu_type,
        )
    worker = min(chosen, key=lambda w: (w.backlog, w.name))
    return RouteDecision(
        queue=worker.direct_queue,
        worker=worker.name,
        reason=f"no ready worker holds it{busy}: not every worker on {queue} can hold {model!r} ({need.sized()}), so "
        f"straight to {worker.name}, the able one with the shortest backlog ({worker.backlog})",
        gpu_type=need.gpu_type,
    )


def route_live(model: str, fleet: FleetSnapshot, settings: Settings) -> RouteDecision:
    """Route one job for ``model`` on ``fleet``: plan it onto the ready workers' types, then :func:`route_on_fleet`.

    Pure but for reading the model's config.json when the producer sees the model root.

    Raises:
        RoutingError: the id is malformed, the model cannot be planned, or no live worker can run it.
        ModelNotFoundError: the producer sees the model root and the model is not installed.
    """
    types = live_gpu_types(fleet, settings)
    needs, refusals = model_needs(model, types, settings)
    left_out = sorted({_catalog_name(w.gpu_type) for w in fleet.routable()} - set(types))
    if left_out:
        allowed = ", ".join(settings.fleet.gpu_types)
        refusals += (f"GPUFLEET_FLEET__GPU_TYPES ({allowed}) leaves out the live {', '.join(left_out)}",)
    suggested: list[ModelNeed] = []
    if not needs:  # name the model's need anyway: what the plan over the configured types asks for
        try:
            placement = placement_for(model, settings)
            need = ModelNeed(placement.gpu_type, placement.gpu_count, placement.weights_bytes, placement.total_bytes)
            where = ", ".join(settings.fleet.gpu_types) or "every catalog GPU type"
            refusals += (f"planned over {where}, it needs {need.describe()}",)
            suggested.append(need)
        except (RoutingError, ModelNotFoundError):
            pass
        suggested += _cpu_need(model, settings)
    return route_on_fleet(
        model, needs, fleet, max_backlog=settings.fleet.max_backlog, refusals=refusals, suggested=suggested
    )


def _cpu_need(model: str, settings: Settings) -> list[ModelNeed]:
    """The model's need on the CPU when the fleet may have CPU workers and the CPU can run it (a GPTQ or AWQ
    model never can), for the error's "start a worker" hint; else nothing."""
    allowed = fleet_gpu_types(settings)
    if allowed is not None and CPU not in {_catalog_name(name) for name in allowed}:
        return []
    try:
        result = _need_cached(plan_target(model, settings), CPU)
    except (GpuError, RoutingError, ModelNotFoundError):
        return []
    return [result] if isinstance(result, ModelNeed) else []


def worker_memory_bytes(worker: WorkerRecord) -> int:
    """What a worker may fill with models: its budget, or its device memory when it reported no budget yet."""
    return worker.memory_budget_bytes or worker.memory_total_bytes


def route_elsewhere(
    model: str,
    fleet: FleetSnapshot,
    settings: Settings,
    *,
    leaving: str,
    leaving_queue: str | None = None,
    more_memory_than: int | None = None,
) -> RouteDecision:
    """Where a worker that cannot serve a job sends it: :func:`route_live`'s rule over the other workers.

    The job must not come back: when the chosen queue is a shared one that a worker left out (``leaving``
    itself, or one without more memory) consumes, the job goes to the direct queue of the least busy able worker
    instead.

    Args:
        model: the job's model.
        fleet: the live fleet.
        settings: the worker's settings (where it sees the model, ``GPUFLEET_FLEET__*``).
        leaving: the worker giving the job away; never chosen.
        leaving_queue: its shared queue, which it consumes even when its own record is missing from ``fleet``.
        more_memory_than: after an out-of-memory error, only workers with more memory than this many bytes
            (:func:`worker_memory_bytes`) are candidates; None: any other worker.

    Returns:
        The decision, its reason saying why the job moved on.

    Raises:
        RoutingError: no other live worker can hold the model; the message names what it needs and what is live.
        ModelNotFoundError: the worker sees the model root and the model is not installed.
    """
    candidates = tuple(
        w
        for w in fleet.workers
        if w.name != leaving and (more_memory_than is None or worker_memory_bytes(w) > more_memory_than)
    )
    others = FleetSnapshot(workers=candidates, read_at=fleet.read_at)
    needs, _ = model_needs(model, live_gpu_types(others, settings), settings)
    try:
        decision = route_on_fleet(model, needs, others, max_backlog=settings.fleet.max_backlog)
    except RoutingError:
        raise RoutingError(_nowhere_else(model, needs, fleet, leaving, more_memory_than)) from None
    if decision.worker is None:
        kept = {w.name for w in candidates}
        left_out = [w.name for w in fleet.routable() if w.type_queue == decision.queue and w.name not in kept]
        if decision.queue == leaving_queue:
            left_out.append(leaving)
        need = next((n for n in needs if n.gpu_type == decision.gpu_type), None)
        able = [w for w in others.routable() if w.type_queue == decision.queue and need and can_hold(w, need, model)]
        if left_out and able:
            worker = min(able, key=lambda w: (not w.ready, w.backlog, w.name))
            return RouteDecision(
                queue=worker.direct_queue,
                worker=worker.name,
                reason=f"{decision.reason}; straight to {worker.name}, as {left_out[0]} shares {decision.queue}",
                gpu_type=decision.gpu_type,
                holding=worker.holds(model),
            )
    return decision


def _nowhere_else(
    model: str, needs: Sequence[ModelNeed], fleet: FleetSnapshot, leaving: str, more_memory_than: int | None
) -> str:
    who = f"no live worker but {leaving}"
    if more_memory_than is not None:
        who = f"no live worker other than {leaving} with more memory than its {fmt_bytes(more_memory_than)}"
    need = f" ({' or '.join(n.describe() for n in needs)})" if needs else ""
    live = [w for w in fleet.live() if w.name != leaving]
    more = f" and {len(live) - MAX_WORKERS_SHOWN} more" if len(live) > MAX_WORKERS_SHOWN else ""
    shown = ", ".join(describe_worker(w) for w in live[:MAX_WORKERS_SHOWN]) + more
    return f"{who} can hold {model!r}{need}; {'other live workers: ' + shown if live else 'no other worker is live'}"


def describe_worker(worker: WorkerRecord) -> str:
    """``cpu-0@host (1 x cpu, budget 2.0 GiB, 512.0 MiB used, ready)`` for messages."""
    state = "draining" if worker.draining else "ready" if worker.ready else "warming up"
    return (
        f"{worker.name} ({worker.gpu_count} x {worker.gpu_type}, budget {fmt_bytes(worker.memory_budget_bytes)}, "
        f"{fmt_bytes(worker.memory_used_bytes)} used, {state})"
    )


def _nothing_can_run(
    model: str,
    needs: Sequence[ModelNeed],
    refusals: Sequence[str],
    fleet: FleetSnapshot,
    suggested: Sequence[ModelNeed] = (),
) -> str:
    if needs:
        need = "it needs " + " or ".join(need.describe() for need in needs)
    else:
        need = "no live GPU type can run it" + (f" ({'; '.join(refusals)})" if refusals else "")
    live = fleet.live()
    if not live:
        shown = "no worker is live: none has sent a heartbeat within its TTL"
    else:
        more = f" and {len(live) - MAX_WORKERS_SHOWN} more" if len(live) > MAX_WORKERS_SHOWN else ""
        shown = "live: " + ", ".join(describe_worker(w) for w in live[:MAX_WORKERS_SHOWN]) + more
    # Only workers that could run it: never `--cpu` for a model only GPUs can run (GPTQ, AWQ, FP8), and `--gpus`
    # when the need spans several GPUs.
    starts = list(dict.fromkeys(need.start_command() for need in (*needs, *suggested)))
    start = f"a worker that can ({', or '.join(starts)})" if starts else "a worker that can run it"
    return (
        f"cannot route a job for {model!r}: {need}, and no ready worker can take it ({shown}). Start {start}, "
        "unpin models to free budget, or pass queue=... explicitly"
    )


def route_by_type(model: str, settings: Settings, why: str) -> RouteDecision:
    """The decision without the live fleet: the queue of the cheapest GPU type of the fleet's settings.

    Raises:
        RoutingError: see :func:`placement_for`.
        ModelNotFoundError: see :func:`placement_for`.
    """
    placement = placement_for(model, settings)
    queue = gpu_type_queue(placement.gpu_type)
    return RouteDecision(
        queue=queue,
        worker=None,
        reason=f"by GPU type ({why}): {placement.gpu_type}",
        gpu_type=placement.gpu_type,
        live=False,
    )
