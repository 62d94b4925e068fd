"""Per-process wiring: the parent records who the worker is; the pool child builds the runtime, warms up, and
only then asks its parent to consume the worker's queues.

Readiness works through Celery's own control channel: the worker starts consuming a placeholder queue only, and
the child, once warm, sends ``add_consumer`` for the GPU type's queue and its direct queue to its own worker. So
no job is reserved by a cold worker (a job reserved while cold would wait there instead of going to a warm peer).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from celery import Celery

from tasks.settings import Settings
from workers.identity import WorkerIdentity
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)

_app: Celery | None = None
_identity: WorkerIdentity | None = None
_settings: Settings | None = None
_runtime: WorkerRuntime | None = None

ANNOUNCE_TIMEOUT_S = 120.0


def configure(app: Celery, identity: WorkerIdentity, settings: Settings) -> None:
    """Record the worker's app, identity and settings in the parent, before the pool forks."""
    global _app, _identity, _settings
    _app, _identity, _settings = app, identity, settings


def runtime() -> WorkerRuntime:
    """The serving runtime of this pool child.

    Raises:
        RuntimeError: called outside a worker's pool child.
    """
    if _runtime is None:
        raise RuntimeError("no worker runtime in this process: task bodies run only inside `gpufleet worker`")
    return _runtime


def on_process_init(**_: Any) -> None:
    """``worker_process_init``: build the runtime, warm up, preload, then start consuming."""
    global _runtime
    if _app is None or _identity is None or _settings is None:
        return  # a worker not started through `gpufleet worker`; nothing to do
    started = time.perf_counter()
    _runtime = WorkerRuntime(_identity, _settings)
    _runtime.publish()  # "not ready" at once: a replaced child must not leave its predecessor's "ready" behind
    _runtime.start()
    log.info("%s warm and ready in %.2f s", _identity.name, time.perf_counter() - started)
    announce_ready(_app, _identity)


def announce_ready(app: Celery, identity: WorkerIdentity, timeout_s: float = ANNOUNCE_TIMEOUT_S) -> None:
    """Ask our own worker to consume its queues; retried until it answers (its control loop may still start).

    Raises:
        RuntimeError: the worker did not answer within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    pending = list(identity.queues)
    while pending:
        queue = pending[0]
        replies = app.control.add_consumer(queue, destination=[identity.name], reply=True, timeout=1.0)
        if any(identity.name in reply for reply in replies or []):
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            raise RuntimeError(f"{identity.name} did not answer add_consumer({queue}) within {timeout_s:g} s")
    log.info("%s consuming %s", identity.name, ", ".join(identity.queues))


def on_process_shutdown(**_: Any) -> None:
    """``worker_process_shutdown``: mark the published state as not ready."""
    if _runtime is not None:
        _runtime.ready = False
        with contextlib.suppress(OSError):
            _runtime.publish()
