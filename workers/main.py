"""``gpufleet worker --gpu N | --cpu``: bind the device, name the worker, start Celery on its queues.

The parent process never touches CUDA (it detects the GPU through NVML); the single prefork pool child does all
CUDA work. Prefork with concurrency 1 keeps the three properties GPU serving needs: the parent answers
ping/inspect/control while a job runs (the solo pool cannot, celery#4967), hard time limits are enforced by
killing the child (solo and threads ignore them, celery#8395, #9203), and a crashed child is replaced.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from celery import signals

from gpufleet.gpu.errors import GpuError
from gpufleet.gpu.repository import resolve_model
from gpufleet.tasks.app import create_app
from gpufleet.tasks.names import boot_queue
from gpufleet.tasks.settings import Settings, load_settings
from gpufleet.workers.common.identity import WorkerIdentity, bind_gpus, cpu_identity, gpus_identity, parse_gpu_list
from gpufleet.workers.errors import WorkerStartError

log = logging.getLogger(__name__)


def build_identity(
    *, gpu: int | None, cpu: bool, name: str | None, gpus: str | Sequence[int] | None = None
) -> WorkerIdentity:
    """Decide the worker's identity and bind its GPUs (before any torch import).

    ``gpus=[0]`` (``--gpus 0``) gives exactly the identity of ``gpu=0`` (``--gpu 0``): same name, queues, device.

    Args:
        gpu: one physical GPU index (``--gpu N``).
        cpu: serve on the CPU (``--cpu``).
        name: the worker name; default from the GPU type and index.
        gpus: several physical GPU indices, as ``"0,1"`` or a sequence (``--gpus 0,1``), all of one type.

    Raises:
        WorkerStartError: not exactly one of --gpu/--gpus/--cpu, a bad list, no such GPU, GPUs of mixed types,
            or torch already imported.
    """
    if sum((gpu is not None, gpus is not None, cpu)) != 1:
        raise WorkerStartError("pass exactly one of --gpu N, --gpus N,M or --cpu")
    if gpu is not None or gpus is not None:
        indices: tuple[int, ...] = (gpu,) if gpu is not None else ()
        if gpus is not None:
            indices = parse_gpu_list(gpus) if isinstance(gpus, str) else tuple(gpus)
        identity = gpus_identity(indices, name=name, flag="--gpu" if gpu is not None else "--gpus")
        bind_gpus(indices)
        return identity
    return cpu_identity(name=name)


def check_priority_models(settings: Settings) -> None:
    """Fail at start-up, in the parent, if a priority model does not resolve (not in a looping child)."""
    hf_cache = settings.hf_cache_dir
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


def run_worker(
    *,
    gpu: int | None,
    cpu: bool,
    name: str | None = None,
    loglevel: str | None = None,
    gpus: str | Sequence[int] | None = None,
) -> None:
    """Start a worker; returns when it shuts down (``gpus``: several GPUs, see :func:`build_identity`).

    Raises:
        WorkerStartError: the worker cannot start (flags, device, settings, priority models).
    """
    from gpufleet.tasks.errors import SettingsError

    try:
        settings = load_settings()
    except SettingsError as exc:
        raise WorkerStartError(str(exc)) from exc
    if (gpu is not None or gpus is not None) and not settings.gpu.enabled:
        raise WorkerStartError("GPUFLEET_GPU__ENABLED is false: start this worker with --cpu, or enable the GPU")
    identity = build_identity(gpu=gpu, cpu=cpu, name=name, gpus=gpus)
    check_priority_models(settings)

    from gpufleet.workers.child import process
    from gpufleet.workers.child.faults import Faults
    from gpufleet.workers.child.jobs import register_tasks
    from gpufleet.workers.common.context import configure
    from gpufleet.workers.parent import control, heartbeat, held_transport
    from gpufleet.workers.parent.consumer import CONSUMER_PATH

    del control  # imported for its @inspect_command registrations
    Faults.from_settings(settings)  # refuse GPUFLEET_FAULTS without diagnostics here, not in a looping child
    app = create_app(settings)
    held_transport.install(app, identity.name, settings)  # before it connects: records what it holds (Redis)
    app.conf.worker_consumer = CONSUMER_PATH  # a message the worker cannot run still gets a contract error
    register_tasks(app, settings)
    configure(app, identity, settings)
    signals.worker_process_init.connect(process.on_process_init, weak=False)
    signals.worker_process_shutdown.connect(process.on_process_shutdown, weak=False)
    # The parent heartbeats to the fleet registry (never the child: it may be busy or replaced).
    signals.worker_ready.connect(heartbeat.on_worker_ready, weak=False)
    signals.worker_shutting_down.connect(heartbeat.on_worker_shutting_down, weak=False)  # draining, at once
    signals.worker_shutdown.connect(heartbeat.on_worker_shutdown, weak=False)
    log.info(
        "starting %s on %s (queues after warm-up: %s)", identity.name, identity.device_label, identity.consumed_queues
    )
    app.worker_main(celery_argv(identity, settings, loglevel))
