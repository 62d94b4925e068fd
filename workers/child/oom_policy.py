"""The one out-of-memory policy of the fleet: evict, retry once, re-route, then refuse clearly.

:mod:`gpufleet.gpu.runtime` turns a device out-of-memory error into :class:`gpufleet.gpu.errors.DeviceOutOfMemoryError`
wherever it happens (a load, the check forward after a load, a job's forward). What to do about it is decided here,
once, for every job that touches the device:

1. evict every unpinned model and hand the allocator's cached blocks back (fragmentation and stale blocks are the
   usual cause), then run the whole step again, once;
2. still out of memory: re-send the job to the next GPU type of the model's plan with more memory, keeping the
   caller's task id (at most :data:`MAX_OOM_HOPS` re-sends along the chain);
3. nothing larger is left: fail with a :class:`gpufleet.tasks.errors.CapacityError` that says what to do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from gpufleet.gpu.errors import DeviceOutOfMemoryError
from gpufleet.tasks.errors import CapacityError

log = logging.getLogger(__name__)

MAX_OOM_HOPS = 2
T = TypeVar("T")


class Relievable(Protocol):
    """What the policy needs of the runtime: a way to free device memory."""

    def relieve_memory(self) -> list[str]: ...


Reroute = Callable[[str], Any]  # queue -> never returns (Celery's Task.replace raises Ignore)
NextQueue = Callable[[], "str | None"]


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
        next_queue: the next GPU type's queue of the model's plan, or None when none is larger.
        reroute: re-sends the job to a queue (does not return).

    Raises:
        CapacityError: out of memory after the retry, and no larger GPU type is left to try.
    """
    try:
        return body()
    except DeviceOutOfMemoryError as exc:
        evicted = runtime.relieve_memory()
        log.warning("%s; evicted %s and retrying once", exc, ", ".join(evicted) or "nothing (all pinned)")
    try:
        return body()
    except DeviceOutOfMemoryError as exc:
        queue = next_queue() if hops_done < MAX_OOM_HOPS else None
        if queue is None:
            raise CapacityError(
                f"{exc}; evicting unpinned models and retrying did not help, and no larger GPU type is left to try "
                f"after {hops_done} re-route(s). Use a quantized variant of {model!r}, a smaller batch or prompt, "
                "or add a GPU type with more memory to the fleet"
            ) from None
        log.warning("out of memory for %s after a retry; re-sending it to %s", model, queue)
        return reroute(queue)  # type: ignore[no-any-return]
