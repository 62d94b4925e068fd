"""The worker's context: what the parent knows before it forks its pool child (app, identity, settings).

:func:`configure` is called once by ``gpufleet worker`` in the parent; the forked child inherits it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from celery import Celery

    from gpufleet.tasks.settings import Settings
    from gpufleet.workers.common.identity import WorkerIdentity


@dataclass(frozen=True)
class WorkerContext:
    """What the parent knows before it forks: the Celery app, who the worker is, its settings."""

    app: Celery
    identity: WorkerIdentity
    settings: Settings


_context: WorkerContext | None = None


def configure(app: Celery, identity: WorkerIdentity, settings: Settings) -> WorkerContext:
    """Record the worker's app, identity and settings in the parent, before the pool forks."""
    global _context
    _context = WorkerContext(app, identity, settings)
    return _context


def context() -> WorkerContext | None:
    """This worker's context, or None in a process not started by ``gpufleet worker``."""
    return _context
