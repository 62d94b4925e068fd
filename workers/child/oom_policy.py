"""The one out-of-memory policy of the fleet: evict, retry once, re-route, then refuse clearly.

:mod:`gpufleet.gpu.runtime` turns a device out-of-memory error into :class:`gpufleet.gpu.errors.DeviceOutOfMemoryError`
wherever it happens (a load, the check forward after a load, a job's forward). What to do about it is decided here,
once, for every job that touches the device:

1. evict every unpinned model and hand the allocator's cached blocks back (fragmentation and stale blocks are the
   usual cause), then run the whole step again, once;
2. still out of memory: re-send the job, keeping the caller's task id, to where the live fleet can hold it: a
   live worker other than this one, with more memory (:func:`gpufleet.workers.child.rerouting.after_oom`, the
   producers' own routing rule; by the plan's GPU types only without a registry), at most :data:`MAX_OOM_HOPS`
   times;
3. nothing larger is live: fail with a :class:`gpufleet.tasks.errors.CapacityError` that says what to do.

The continuous-batching session applies steps 2 and 3 to a sequence its decode loop could not relieve
(:func:`give_away`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from gpufleet.gpu.errors import DeviceOutOfMemoryError
from gpufleet.tasks.errors import CapacityError
from gpufleet.workers.child.rerouting import Onward

log = logging.getLogger(__name__)

MAX_OOM_HOPS = 2
T = TypeVar("T")


class Relievable(Protocol):
    """What the policy needs of the runtime: a way to free device memory."""

    def relieve_memory(self) -> list[str]: ...


Reroute = Callable[[Onward], Any]  # re-sends the job -> never returns (it raises to end the step)
NextQueue = Callable[[], Onward]


def give_away(error: BaseException, *, model: str, hops_done: int, next_queue: NextQueue, advice: str) -> Onward:
    """Where a job still out of memory after the retry goes (steps 2 and 3 of the policy).

    Args:
        error: the out-of-memory error, for the message.
        model: the job's model id, for the message.
        hops_done: how many times this job was already re-sent for lack of memory.
        next_queue: where the live fleet (or, without a registry, the plan) can hold it, or why nowhere.
        advice: what the caller may change, ending the message.

    Returns:
        Where to re-send it (its queue is set).

    Raises:
        CapacityError: nowhere, or the job already used its :data:`MAX_OOM_HOPS`.
    """
    if hops_done >= MAX_OOM_HOPS:
        why = f"it was re-sent for lack of memory {hops_done} time(s) already, the most a job is"
    else:
        onward = next_queue()
        if onward.queue is not None:
            log.warning(
                "out of memory for %s after a retry; re-sending it to %s: %s", model, onward.queue, onward.reason
            )
            return onward
        why = onward.reason
    raise CapacityError(
        f"{error}; evicting unpinned models and retrying did not help after {hops_done} re-route(s), and {why}. "
        f"{advice}"
    ) from None


def run_with_oom_policy(
    body: Callable[[], T],
    *,
    model: str,
    runtime: Relievable,
    hops_done: int,
    next_queue: NextQueue,
    reroute: Reroute,
) -> T:
    """Run ``body`` under the OOM policy.

    Args:
        body: the step that touches the device (acquire the model and run it); run at most twice here.
        model: the job's model id, for the messages.
        runtime: frees memory between the two tries.
        hops_done: how many times this job was already re-sent for lack of memory.
        next_queue: where a live worker with more memory can hold the model, or why none can.
        reroute: re-sends the job there (does not return).

    Raises:
        CapacityError: out of memory after the retry, and no live worker with more memory can hold the model.
    """
    try:
        return body()
    except DeviceOutOfMemoryError as exc:
        evicted = runtime.relieve_memory()
        log.warning("%s; evicted %s and retrying once", exc, ", ".join(evicted) or "nothing (all pinned)")
    try:
        return body()
    except DeviceOutOfMemoryError as exc:
        advice = (
            f"Use a quantized variant of {model!r}, a smaller batch or prompt, or start a worker with more memory "
            "(a larger GPU type) for it"
        )
        onward = give_away(exc, model=model, hops_done=hops_done, next_queue=next_queue, advice=advice)
        return reroute(onward)  # type: ignore[no-any-return]
