"""Configuration sections owned by the ``gpu`` package.

These are plain pydantic models: ``gpufleet.tasks.settings`` binds them to ``GPUFLEET_*`` environment variables, and
``workers`` hands them to the runtime parts. Keeping them here lets the library be configured without Celery.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Precision(str, Enum):
    """Floating-point precision the worker serves models in."""

    AUTO = "auto"  # bf16 where the GPU supports it, else fp16; fp32 on CPU
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class WarmupOp(str, Enum):
    """Warm-up operations (``GPUFLEET_GPU__WARMUP__OPERATIONS``)."""

    MATMUL = "matmul"
    CONV2D = "conv2d"
    MEMORY = "memory"


class WarmupSize(str, Enum):
    """How large the warm-up shapes are."""

    SMALL = "small"
    MEDIUM = "medium"
    LARGE = "large"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WarmupConfig(_Section):
    """``GPUFLEET_GPU__WARMUP__*``: what runs before a worker consumes jobs."""

    enabled: bool = True
    on_startup: bool = True
    operations: tuple[WarmupOp, ...] = (WarmupOp.MATMUL, WarmupOp.CONV2D, WarmupOp.MEMORY)
    size: WarmupSize = WarmupSize.MEDIUM
    # A forward pass of a representative shape after each model load, so the first job runs at steady speed.
    after_load: bool = True


class MemoryPoolConfig(_Section):
    """``GPUFLEET_GPU__MEMORY_POOL__*``: the per-device memory budget and allocator settings."""

    enabled: bool = True
    preallocate_common_sizes: bool = False
    common_sizes_mb: tuple[int, ...] = (64, 256, 1024)
    # Explicit budget; when set it wins over ``GpuConfig.memory_fraction`` (like vLLM's kv-cache-memory override).
    budget_bytes: int | None = Field(default=None, gt=0)
    # Host memory for models parked off the GPU (pinned, restored at copy speed). 0 disables parking.
    host_budget_bytes: int = Field(default=0, ge=0)
    # Unload a model (pinned ones excepted) after this many seconds without a job; None keeps models until
    # evicted for room. The model cache's expire() applies it; the worker calls that from a timer.
    idle_ttl_s: float | None = Field(default=None, gt=0)

    @field_validator("common_sizes_mb")
    @classmethod
    def _positive_sizes(cls, sizes: tuple[int, ...]) -> tuple[int, ...]:
        if any(size <= 0 for size in sizes):
            raise ValueError("every common size must be a positive number of MiB")
        return sizes


class GpuConfig(_Section):
    """``GPUFLEET_GPU__*``: how a worker uses its device."""

    enabled: bool = True
    memory_fraction: float = Field(default=0.90, gt=0.0, le=1.0)
    precision: Precision = Precision.AUTO
    warmup: WarmupConfig = WarmupConfig()
    memory_pool: MemoryPoolConfig = MemoryPoolConfig()
