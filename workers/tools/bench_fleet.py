"""A benchmark's own small fleet: the environment of its CPU workers and the producer that talks to them.

The overhead, queue and soak benchmarks each start a private redis-server and real ``gpufleet worker --cpu``
processes; this is the one place that says how such a worker is configured and how the benchmark's producer
reaches it.
"""

from __future__ import annotations

from pathlib import Path

from gpufleet.tasks.client import FleetClient
from gpufleet.tasks.settings import load_settings
from gpufleet.workers.tools.local_redis import LocalRedis


def worker_env(redis: LocalRedis, models: Path, **extra: str) -> dict[str, str]:
    """A benchmark worker's environment: broker on database 0, results on 1, the demo model root, a small
    warm-up, quiet logs, no hub; ``extra`` (``GPUFLEET_*`` names) adds or overrides."""
    return {
        "GPUFLEET_BROKER_URL": redis.url(0),
        "GPUFLEET_RESULT_BACKEND": redis.url(1),
        "GPUFLEET_MODEL_ROOT": str(models),
        "GPUFLEET_GPU__WARMUP__SIZE": "small",
        "GPUFLEET_WORKER__LOGLEVEL": "WARNING",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        **extra,
    }


def producer(env: dict[str, str], *, gpu_types: tuple[str, ...] = ("cpu",)) -> FleetClient:
    """The benchmark's producer: the workers' broker and result backend, planning onto ``gpu_types``."""
    settings = load_settings(
        broker_url=env["GPUFLEET_BROKER_URL"],
        result_backend=env["GPUFLEET_RESULT_BACKEND"],
        model_root=Path(env["GPUFLEET_MODEL_ROOT"]),
        fleet={"gpu_types": gpu_types},
    )
    return FleetClient(settings=settings)
