"""Who a worker is: its devices, GPU type, name and queues, fixed before any torch import."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from gpufleet.tasks.names import CPU_QUEUE, FLEET_QUEUE, gpu_type_queue, gpu_type_slug, worker_queue
from gpufleet.workers.errors import WorkerStartError


@dataclass(frozen=True)
class WorkerIdentity:
    """A worker process's identity, decided in the parent before the pool child starts."""

    name: str  # "h100-0@host", "h100x2-0@host", "cpu-0@host"
    gpu_type: str  # catalog name: "H100", "A100-80GB", "cpu"
    device: str  # torch device inside the process (the first of its GPUs): "cuda:0" or "cpu"
    device_index: int | None  # physical (NVML / PCI order) index of its first GPU; None on CPU
    device_name: str  # "NVIDIA H100 80GB HBM3", "2x NVIDIA H100 80GB HBM3" or "cpu"
    memory_bytes: int  # device memory, summed over its GPUs (host memory for cpu workers)
    gpu_indices: tuple[int, ...] = ()  # physical (NVML) indices of every GPU it owns; empty on CPU

    @property
    def gpu_count(self) -> int:
        """Devices one model may span (1 on a CPU worker)."""
        return max(1, len(self.gpu_indices))

    @property
    def devices(self) -> tuple[str, ...]:
        """The torch device of each GPU it owns: ``cuda:0`` .. ``cuda:N-1`` (the binding renumbers them).

        ``("cpu",)`` on a CPU worker; an identity on the CPU that lists GPU indices (tests standing in for a
        multi-GPU worker) gets ``"cpu"`` once per index.
        """
        if self.device.startswith("cuda"):
            return tuple(f"cuda:{i}" for i in range(self.gpu_count))
        return (self.device,) * self.gpu_count

    @property
    def queues(self) -> tuple[str, ...]:
        """The GPU type's shared queue and this worker's direct queue."""
        return (gpu_type_queue(self.gpu_type), worker_queue(self.gpu_type, self.name))

    @property
    def consumed_queues(self) -> tuple[str, ...]:
        """Every queue the worker consumes once warm: its :attr:`queues` and the fleet's entry queue, whose jobs
        its parent forwards as the router would (:mod:`gpufleet.workers.parent.entry`)."""
        return (*self.queues, FLEET_QUEUE)

    @property
    def device_label(self) -> str:
        if self.device == "cpu":
            return self.device
        if self.gpu_count == 1:
            return f"{self.device} ({self.device_name})"
        return f"cuda:0-{self.gpu_count - 1} ({self.device_name})"


def worker_name(gpu_type: str, index: int, host: str | None = None, *, gpu_count: int = 1) -> str:
    """``h100-0@host``: GPU type slug, first device index, host; ``h100x2-0@host`` for a worker of 2 GPUs."""
    slug = gpu_type_slug(gpu_type)
    count = f"x{gpu_count}" if gpu_count > 1 else ""
    return f"{slug}{count}-{index}@{host or socket.gethostname()}"


def parse_gpu_list(text: str) -> tuple[int, ...]:
    """The physical GPU indices of ``--gpus 0,1``: distinct, non-negative, in the order given.

    Args:
        text: comma-separated indices (spaces allowed).

    Returns:
        The indices.

    Raises:
        WorkerStartError: the list is empty, holds something that is not an index, or repeats one.
    """
    parts = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not part.isdigit() for part in parts):
        raise WorkerStartError(f"--gpus takes comma-separated GPU indices such as 0,1 (NVML / PCI order), got {text!r}")
    indices = tuple(int(part) for part in parts)
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    if repeated:
        raise WorkerStartError(
            f"--gpus {text} lists GPU {', '.join(map(str, repeated))} more than once; name each GPU once"
        )
    return indices


def bind_gpus(indices: Sequence[int]) -> None:
    """Make physical GPUs ``indices`` the only devices this process (and its children) can see.

    Must run before torch is imported: CUDA reads ``CUDA_VISIBLE_DEVICES`` once, at initialisation. PCI bus order
    makes CUDA's numbering agree with NVML's, which named the devices; inside the process they are ``cuda:0`` ..
    ``cuda:N-1`` in the order given.

    Args:
        indices: physical (NVML) indices, at least one.

    Raises:
        WorkerStartError: torch is already imported, so the binding would be ignored, or no index was given.
    """
    if not indices:
        raise WorkerStartError("no GPU to bind: pass --gpu N, --gpus N,M or --cpu")
    if "torch" in sys.modules:
        raise WorkerStartError(
            "torch was imported before the GPU was bound; start workers through `gpufleet worker --gpu N` "
            "(or --gpus N,M)"
        )
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in indices)


def bind_gpu(index: int) -> None:
    """Make physical GPU ``index`` the only device this process can see; see :func:`bind_gpus`.

    Raises:
        WorkerStartError: torch is already imported, so the binding would be ignored.
    """
    bind_gpus((index,))


def gpus_identity(indices: Sequence[int], *, name: str | None = None, flag: str = "--gpus") -> WorkerIdentity:
    """Detect GPUs ``indices`` through NVML (no CUDA context) and build the identity of a worker owning them all.

    Every GPU must serve as the same catalog type: a model split across them runs at the pace of the slowest,
    and the router plans a type, so a mix would be advertised as something it is not.

    Args:
        indices: physical (NVML / PCI order) indices, at least one, distinct.
        name: the worker name; default ``<type>-<first index>@host`` (``<type>x<count>-<first index>@host``).
        flag: the command-line flag the indices came from, for the messages.

    Returns:
        The identity: memory summed over the GPUs, ``gpu_indices`` as given.

    Raises:
        WorkerStartError: NVML is unavailable, an index has no GPU, or the GPUs are of different types.
    """
    from gpufleet.gpu.errors import ConfigError
    from gpufleet.gpu.nvml import list_devices
    from gpufleet.gpu.plan.catalog import gpu_type_from_device_name

    if not indices:
        raise WorkerStartError(f"{flag} names no GPU; pass at least one index, or --cpu")
    try:
        devices = list_devices()
    except ConfigError as exc:
        raise WorkerStartError(str(exc)) from exc
    missing = [i for i in indices if not 0 <= i < len(devices)]
    if missing:
        listed = ",".join(str(i) for i in indices)
        what = (
            f"{flag} {listed}"
            if listed == str(missing[0])
            else f"GPU {', '.join(map(str, missing))} of {flag} {listed}"
        )
        raise WorkerStartError(
            f"{what} does not exist: this host has {len(devices)} NVIDIA GPU(s) "
            f"({', '.join(d.name for d in devices) or 'none'}); use {flag} 0..{len(devices) - 1} or --cpu"
        )
    infos = [devices[i] for i in indices]
    types = []
    for info in infos:
        try:
            types.append(gpu_type_from_device_name(info.name, info.memory_bytes, info.compute_capability))
        except ConfigError as exc:
            raise WorkerStartError(str(exc)) from exc
    if len(set(types)) > 1:
        found = ", ".join(f"GPU {i}: {info.name} ({kind})" for i, info, kind in zip(indices, infos, types, strict=True))
        raise WorkerStartError(
            f"{flag} mixes GPU types ({found}); one worker serves one GPU type: start one worker per type, "
            "each with --gpus listing GPUs of that type only"
        )
    gpu_type, first = types[0], indices[0]
    count = len(indices)
    return WorkerIdentity(
        name=name or worker_name(gpu_type, first, gpu_count=count),
        gpu_type=gpu_type,
        device="cuda:0",
        device_index=first,
        device_name=infos[0].name if count == 1 else f"{count}x {infos[0].name}",
        memory_bytes=sum(info.memory_bytes for info in infos),
        gpu_indices=tuple(indices),
    )


def gpu_identity(index: int, *, name: str | None = None) -> WorkerIdentity:
    """Detect GPU ``index`` through NVML (no CUDA context) and build the worker's identity.

    Raises:
        WorkerStartError: NVML is unavailable or there is no GPU with that index.
    """
    return gpus_identity((index,), name=name, flag="--gpu")


def cpu_identity(*, name: str | None = None, index: int = 0) -> WorkerIdentity:
    """Identity of a CPU worker (queue ``cpu``)."""
    import psutil

    return WorkerIdentity(
        name=name or worker_name(CPU_QUEUE, index),
        gpu_type=CPU_QUEUE,
        device="cpu",
        device_index=None,
        device_name="cpu",
        memory_bytes=int(psutil.virtual_memory().total),
    )
