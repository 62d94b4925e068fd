"""Stable task names and queue names: the wire contract producers rely on."""

from __future__ import annotations

from enum import Enum


class TaskName(str, Enum):
    """Task names producers pass to ``send_task``. Never rename one: callers hard-code these strings."""

    EMBED = "fleet.embed"
    GENERATE = "fleet.generate"
    LOAD_MODEL = "fleet.load_model"
    UNLOAD_MODEL = "fleet.unload_model"
    # Holds the worker's process for a few seconds: for checking liveness, limits and control while busy.
    SLEEP = "fleet.diag.sleep"
    # Does nothing, outside the fleet's job bookkeeping: Celery's own round trip, the yardstick of per-job overhead.
    NOOP = "fleet.diag.noop"


ENQUEUED_AT_HEADER = "fleet_enqueued_at"
"""Message header: when the producer sent the job (seconds since the epoch); the worker reports the queue wait."""

FORWARDED_HEADER = "fleet_forwarded_by"
"""Message header: the worker that forwarded the job after taking it from a shared queue whose model it could not
hold. A job carrying it is never forwarded again (it fails where it lands instead of looping)."""

FLEET_QUEUE = "fleet"
"""The entry queue every worker consumes: a job sent there (a plain Celery client's, or any job sent without a
queue through gpufleet's app) is forwarded to where the producer-side router would have sent it. Never Celery's own
``celery`` queue, which other applications on the same broker use."""

CPU_QUEUE = "cpu"
QUEUE_PREFIX = "gpu."


def gpu_type_slug(gpu_type: str) -> str:
    """A GPU type as it appears in queue and worker names: ``A100_80GB`` -> ``a100-80gb``."""
    return gpu_type.lower().replace("_", "-")


def gpu_type_queue(gpu_type: str) -> str:
    """Queue shared by every worker of a GPU type: ``H100`` -> ``gpu.h100``; ``cpu`` -> ``cpu``."""
    slug = gpu_type_slug(gpu_type)
    return CPU_QUEUE if slug == CPU_QUEUE else QUEUE_PREFIX + slug


def is_cpu_queue(queue: str) -> bool:
    """Whether ``queue`` is served by CPU workers: the ``cpu`` type queue or a CPU worker's direct queue."""
    return queue == CPU_QUEUE or queue.startswith(CPU_QUEUE + ".")


def worker_queue(gpu_type: str, worker_name: str) -> str:
    """A worker's own direct queue: ``gpu.h100.h100-0@host`` (``cpu.cpu-0@host`` on CPU)."""
    return f"{gpu_type_queue(gpu_type)}.{worker_name}"


def boot_queue(worker_name: str) -> str:
    """Placeholder queue a worker listens on until warm-up ends; nothing is ever sent to it."""
    return f"fleet.boot.{worker_name}"
