"""Pool-child lifecycle: build the runtime, warm up, and only then ask the worker to consume its queues.

Readiness works through Celery's own control channel: the worker starts consuming a placeholder queue only, and
the child, once warm, sends ``add_consumer`` for the GPU type's queue, its direct queue and the fleet's entry queue
to its own worker. So no job is reserved by a cold worker (a job reserved while cold would wait there instead of
going to a warm peer).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from celery import Celery

from gpufleet.tasks.names import boot_queue
from gpufleet.workers.child import state
from gpufleet.workers.child.runtime import WorkerRuntime
from gpufleet.workers.common.context import context as worker_context
from gpufleet.workers.common.identity import WorkerIdentity
from gpufleet.workers.common.snapshot import state_path

log = logging.getLogger(__name__)

ANNOUNCE_TIMEOUT_S = 120.0


def on_process_init(**_: Any) -> None:
    """``worker_process_init``: build the runtime, warm up, preload, then start consuming."""
    context = worker_context()
    if context is None:
        return  # a worker not started through `gpufleet worker`; nothing to do
    started = time.perf_counter()
    # Celery logs "<name> ready." once its pool is up, while this child may still be warming: say here what
    # that line does not, so an operator reading the log knows when jobs are really taken.
    log.info(
        "%s warming up: it takes no job until it is warm (Celery's 'ready.' means only its placeholder queue %s)",
        context.identity.name,
        boot_queue(context.identity.name),
    )
    path = state_path(context.settings, context.identity.name)
    runtime = WorkerRuntime(context.identity, context.settings, on_change=lambda rt: state.publish(rt, path))
    state.set_runtime(runtime)
    runtime.changed()  # "not ready" at once: a replaced child must not leave its predecessor's "ready" behind
    runtime.start()
    log.info("%s warm and ready in %.2f s", context.identity.name, time.perf_counter() - started)
    announce_ready(context.app, context.identity)


def announce_ready(app: Celery, identity: WorkerIdentity, timeout_s: float = ANNOUNCE_TIMEOUT_S) -> None:
    """Ask our own worker to consume its queues; retried until it answers (its control loop may still start).

    Raises:
        RuntimeError: the worker did not answer within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    pending = list(identity.consumed_queues)
    while pending:
        queue = pending[0]
        replies = app.control.add_consumer(queue, destination=[identity.name], reply=True, timeout=1.0)
        if any(identity.name in reply for reply in replies or []):
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            raise RuntimeError(f"{identity.name} did not answer add_consumer({queue}) within {timeout_s:g} s")
    log.info("%s is taking jobs now: consuming %s", identity.name, ", ".join(identity.consumed_queues))


def on_process_shutdown(**_: Any) -> None:
    """``worker_process_shutdown``: stop background work and mark the published state as not ready."""
    with contextlib.suppress(RuntimeError):
        runtime = state.runtime()
        runtime.stop()
        with contextlib.suppress(OSError):
            runtime.changed()
