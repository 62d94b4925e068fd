"""Listing NVIDIA devices through NVML, without creating a CUDA context.

Touching CUDA in a process that later forks breaks its children; NVML does not, so the worker's parent process
detects its GPU here (as vLLM does) and leaves CUDA to the pool child.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpufleet.gpu.errors import ConfigError


@dataclass(frozen=True)
class DeviceInfo:
    """One NVIDIA device as NVML reports it (index in PCI bus order)."""

    index: int
    name: str
    memory_bytes: int
    uuid: str
    # (major, minor): what the board can run (bf16 from 8.0, FP8 from 8.9), for boards the catalog does not know.
    compute_capability: tuple[int, int]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def list_devices() -> list[DeviceInfo]:
    """All NVIDIA devices on this host.

    Raises:
        ConfigError: NVML is missing or reports no driver (no NVIDIA GPU here).
    """
    try:
        import pynvml
    except ImportError as exc:
        raise ConfigError(
            "NVML bindings are not installed: pip install 'gpufleet[worker]' (nvidia-ml-py), or run --cpu"
        ) from exc
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise ConfigError(f"no NVIDIA driver answered NVML ({exc}); on a machine without a GPU use --cpu") from exc
    try:
        devices = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            devices.append(
                DeviceInfo(
                    index=index,
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    memory_bytes=int(memory.total),
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    compute_capability=(int(major), int(minor)),
                )
            )
        return devices
    finally:
        pynvml.nvmlShutdown()


def device_memory(index: int) -> dict[str, int]:
    """Live total/used/free bytes of one device from NVML (safe in a process without CUDA)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
        return {"total_bytes": int(info.total), "used_bytes": int(info.used), "free_bytes": int(info.free)}
    finally:
        pynvml.nvmlShutdown()
