"""``gpufleet worker --gpu N | --cpu``: bind the device, name the worker, start Celery on its queues.

The parent process never touches CUDA (it detects the GPU through NVML); the single prefork pool child does all
CUDA work. Prefork with concurrency 1 keeps the three properties GPU serving needs: the parent answers
ping/inspect/control while a job runs (the solo pool cannot, celery#4967), hard time limits are enforced by
killing the child (solo and threads ignore them, celery#8395, #9203), and a crashed child is replaced.
"""

from __future__ import annotations

import logging

from celery import signals

from gpu.errors import GpuError
from gpu.repository import default_hf_cache, resolve_model
from tasks.app import create_app
from tasks.names import boot_queue
from tasks.settings import Settings, load_settings
from workers.errors import WorkerStartError
from workers.identity import WorkerIdentity, bind_gpu, cpu_identity, gpu_identity

log = logging.getLogger(__name__)


def build_identity(*, gpu: int | None, cpu: bool, name: str | None) -> WorkerIdentity:
    """Decide the worker's identity and bind its GPU (before any torch import).

    Raises:
        WorkerStartError: neither or both of --gpu/--cpu, no such GPU, or torch already imported.
    """
    if (gpu is None) == (not cpu):
        raise WorkerStartError("pass exactly one of --gpu N or --cpu")
    if gpu is not None:
        identity = gpu_identity(gpu, name=name)
        bind_gpu(gpu)
        return identity
    return cpu_identity(name=name)


def check_priority_models(settings: Settings) -> None:
    """Fail at start-up, in the parent, if a priority model does not resolve (not in a looping child)."""
    hf_cache = settings.hf_cache or default_hf_cache()
    for model_id in settings.priority_models:
        try:
            resolve_model(model_id, settings.model_root, hf_cache)
        except GpuError as exc:
            raise WorkerStartError(f"GPUFLEET_PRIORITY_MODELS lists {model_id!r}: {exc}") from exc


def celery_argv(identity: WorkerIdentity, settings: Settings, loglevel: str | None) -> list[str]:
    """The ``celery worker`` arguments: prefork, one process, named after the device, placeholder queue."""
    return [
        "worker",
        "--pool=prefork",
        "--concurrency=1",
        f"--hostname={identity.name}",
        # Only the placeholder until the child is warm; it then adds the real queues (workers.process).
        f"--queues={boot_queue(identity.name)}",
        f"--loglevel={loglevel or settings.worker.loglevel}",
        "--task-events",
        "--without-mingle",
        "--without-gossip",
    ]


def run_worker(*, gpu: int | None, cpu: bool, name: str | None = None, loglevel: str | None = None) -> None:
    """Start a worker; returns when it shuts down.

    Raises:
        WorkerStartError: the worker cannot start (flags, device, settings, priority models).
    """
    from tasks.errors import SettingsError

    try:
        settings = load_settings()
    except SettingsError as exc:
        raise WorkerStartError(str(exc)) from exc
    if gpu is not None and not settings.gpu.enabled:
        raise WorkerStartError("GPUFLEET_GPU__ENABLED is false: start this worker with --cpu, or enable the GPU")
    identity = build_identity(gpu=gpu, cpu=cpu, name=name)
    check_priority_models(settings)

    from workers import control, process, state
    from workers.faults import Faults
    from workers.jobs import register_tasks

    del control  # imported for its @inspect_command registrations
    Faults.from_settings(settings)  # refuse GPUFLEET_FAULTS without diagnostics here, not in a looping child
    app = create_app(settings)
    register_tasks(app, settings)
    state.configure(app, identity, settings)
    signals.worker_process_init.connect(process.on_process_init, weak=False)
    signals.worker_process_shutdown.connect(process.on_process_shutdown, weak=False)
    log.info("starting %s on %s (queues after warm-up: %s)", identity.name, identity.device_label, identity.queues)
    app.worker_main(celery_argv(identity, settings, loglevel))
