"""Who a worker is: its device, GPU type, name and queues, fixed before any torch import."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

from tasks.names import CPU_QUEUE, gpu_type_queue, worker_queue
from workers.errors import WorkerStartError


@dataclass(frozen=True)
class WorkerIdentity:
    """A worker process's identity, decided in the parent before the pool child starts."""

    name: str  # "h100-0@host", "cpu-0@host"
    gpu_type: str  # catalog name: "H100", "A100-80GB", "cpu"
    device: str  # torch device inside the process: "cuda:0" or "cpu"
    device_index: int | None  # physical (NVML / PCI order) index; None on CPU
    device_name: str  # "NVIDIA H100 80GB HBM3" or "cpu"
    memory_bytes: int  # device memory, summed over its GPUs (host memory for cpu workers)
    gpu_indices: tuple[int, ...] = ()  # physical (NVML) indices of every GPU it owns; empty on CPU

    @property
    def gpu_count(self) -> int:
        """Devices one model may span (1 on a CPU worker)."""
        return max(1, len(self.gpu_indices))

    @property
    def queues(self) -> tuple[str, ...]:
        """The GPU type's shared queue and this worker's direct queue."""
        return (gpu_type_queue(self.gpu_type), worker_queue(self.gpu_type, self.name))

    @property
    def device_label(self) -> str:
        return self.device if self.device == "cpu" else f"{self.device} ({self.device_name})"


def worker_name(gpu_type: str, index: int, host: str | None = None) -> str:
    """``h100-0@host``: GPU type slug, device index, host."""
    slug = gpu_type.lower().replace("_", "-")
    return f"{slug}-{index}@{host or socket.gethostname()}"


def bind_gpu(index: int) -> None:
    """Make physical GPU ``index`` the only device this process (and its children) can see.

    Must run before torch is imported: CUDA reads ``CUDA_VISIBLE_DEVICES`` once, at initialisation.
    PCI bus order makes CUDA's numbering agree with NVML's, which named the device.

    Raises:
        WorkerStartError: torch is already imported, so the binding would be ignored.
    """
    if "torch" in sys.modules:
        raise WorkerStartError(
            "torch was imported before the GPU was bound; start workers through `gpufleet worker --gpu N`"
        )
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    os.environ["CUDA_VISIBLE_DEVICES"] = str(index)


def gpu_identity(index: int, *, name: str | None = None) -> WorkerIdentity:
    """Detect GPU ``index`` through NVML (no CUDA context) and build the worker's identity.

    Raises:
        WorkerStartError: NVML is unavailable or there is no GPU with that index.
    """
    from gpu.errors import ConfigError
    from gpu.plan.catalog import gpu_type_from_device_name
    from gpu.runtime.nvml import list_devices

    try:
        devices = list_devices()
    except ConfigError as exc:
        raise WorkerStartError(str(exc)) from exc
    if not 0 <= index < len(devices):
        raise WorkerStartError(
            f"--gpu {index} does not exist: this host has {len(devices)} NVIDIA GPU(s) "
            f"({', '.join(d.name for d in devices) or 'none'}); use --gpu 0..{len(devices) - 1} or --cpu"
        )
    info = devices[index]
    try:
        gpu_type = gpu_type_from_device_name(info.name, info.memory_bytes, info.compute_capability)
    except ConfigError as exc:
        raise WorkerStartError(str(exc)) from exc
    return WorkerIdentity(
        name=name or worker_name(gpu_type, index),
        gpu_type=gpu_type,
        device="cuda:0",
        device_index=index,
        device_name=info.name,
        memory_bytes=info.memory_bytes,
        gpu_indices=(index,),
    )


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
