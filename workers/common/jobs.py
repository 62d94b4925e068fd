"""What the parent hands the pool child for a batch of jobs, and what comes back: plain, picklable data.

The parent (:mod:`gpufleet.workers.parent.batching`) turns each reserved Celery request into a :class:`JobPayload`
and asks the pool to call :func:`run_in_child` with :data:`PIPELINE_ENTRY` (by name, so the parent never imports
the child side); the child answers one :data:`Outcome` per job, in order, which the parent passes to Celery's own
per-request handlers.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from gpufleet.tasks.names import ENQUEUED_AT_HEADER

# Celery's (failed, result repr or ExceptionInfo, runtime seconds) for one job: what Request.on_success takes.
Outcome = tuple[bool, Any, float]

PIPELINE_ENTRY = "gpufleet.workers.child.pipeline:run_batch"
"""The child's entry point for a batch: ``run_batch(task_name, payloads) -> list[Outcome]``."""


@dataclass
class JobPayload:
    """One job of a batch, as the parent sends it to the child."""

    id: str
    args: list[Any]
    kwargs: Any  # a mapping for every well-formed message; anything else fails its job in the child
    request_dict: dict[str, Any]

    @property
    def hops_done(self) -> int:
        """How many times this job was already re-sent for lack of memory (Celery's ``replaced_task_nesting``)."""
        return int(self.request_dict.get("replaced_task_nesting", 0) or 0)

    def header(self, name: str) -> Any:
        """A message header the producer set (Celery merges them into the request; older clients nest them)."""
        value = self.request_dict.get(name)
        if value is None:
            nested = self.request_dict.get("headers")
            value = nested.get(name) if isinstance(nested, dict) else None
        return value

    def enqueued_at(self) -> float | None:
        """When the producer sent the job (the :data:`~gpufleet.tasks.names.ENQUEUED_AT_HEADER` header)."""
        value = self.header(ENQUEUED_AT_HEADER)
        try:
            return float(value) if value is not None else None
        except (TypeError, ValueError):
            return None

    @property
    def model(self) -> str | None:
        """The model the job names, or None (a malformed job fails in the child)."""
        model = self.kwargs.get("model") if isinstance(self.kwargs, dict) else None
        return model if isinstance(model, str) else None


def payload_of(request: Any) -> JobPayload:
    """What the child needs of a Celery ``Request`` (runs in the parent)."""
    return JobPayload(request.id, list(request.args), request.kwargs, dict(request.request_dict))


def run_in_child(entry: str, *args: Any) -> Any:
    """Call ``module:function`` named by ``entry`` (in the pool child, where the parent sent it by name)."""
    module_name, _, function = entry.partition(":")
    return getattr(importlib.import_module(module_name), function)(*args)
