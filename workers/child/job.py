"""One job on its way through the pipeline, and what a task body may ask of the pipeline while serving it.

Record and protocol live here, apart from :mod:`~gpufleet.workers.child.pipeline` (which runs jobs) and
:mod:`~gpufleet.workers.child.task_base` (which declares tasks), so neither imports the other's module to name them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from gpufleet.workers.common.jobs import JobPayload

if TYPE_CHECKING:
    from gpufleet.workers.child.runtime import Acquired, WorkerRuntime


@dataclass
class Job:
    """A valid job on its way through the pipeline."""

    index: int  # its place in the batch (outcomes go back in order)
    payload: JobPayload
    request: Any  # the task's request model
    prepared: Any = None  # what the task's prepare() made of it (batched engines)

    @property
    def id(self) -> str:
        return self.payload.id


class JobServices(Protocol):
    """What a one-by-one task body uses of the pipeline serving its job."""

    @property
    def runtime(self) -> WorkerRuntime: ...

    def acquire(self, model: str, jobs: list[Job], *, pinned: bool = False) -> Acquired | None: ...
