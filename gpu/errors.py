"""Errors raised by the ``gpu`` package.

Every message says what happened and what to do about it. Foreign errors (CUDA OOM, safetensors, OS errors)
are translated once, at the boundary where they occur.

Hierarchy::

    GpuError
    ├── ConfigError               a setting or argument is invalid
    ├── ModelNotInstalledError    a model id does not resolve to a local directory
    ├── UnsafeModelIdError        a model id escapes the model root or is malformed
    ├── ModelSpecError            a config.json or model name cannot be understood
    ├── PlanningError             no GPU type in the catalog can hold the model
    ├── LoadFailedError           weights could not be read or placed on the device
    │   ├── UnsupportedQuantizationError a quantized checkpoint needs kernels or a GPU this worker lacks
    │   └── CheckpointFormatError a weight file is not a readable safetensors file (also a ModelSpecError)
    ├── BudgetExceededError       the memory budget cannot hold a model
    │   ├── AllPinnedError        eviction cannot free enough because the rest is pinned
    │   └── DeviceOutOfMemoryError the device itself ran out of memory (translated CUDA OOM)
    └── ForwardError              a model failed while answering a request
"""

from __future__ import annotations


class GpuError(Exception):
    """Root of every error the ``gpu`` package raises on purpose."""


class ConfigError(GpuError):
    """A setting or argument is invalid."""


class ModelNotInstalledError(GpuError):
    """A model id does not resolve to a local model directory."""


class UnsafeModelIdError(GpuError):
    """A model id is malformed or would escape the configured model root."""


class ModelSpecError(GpuError):
    """A config.json or a model name cannot be understood well enough to plan with."""


class PlanningError(GpuError):
    """No GPU type (or count of them) in the catalog can hold the model."""


class LoadFailedError(GpuError):
    """Weights could not be read or placed on the device."""


class UnsupportedQuantizationError(LoadFailedError):
    """A quantized checkpoint needs CUDA kernels, a newer GPU or a package this worker does not have.

    Raised from config.json alone, before any weight is read; the message names what is missing.
    """


class BudgetExceededError(GpuError):
    """The memory budget cannot hold a model."""


class AllPinnedError(BudgetExceededError):
    """Eviction cannot free enough memory because everything left is pinned."""


class DeviceOutOfMemoryError(BudgetExceededError):
    """The device ran out of memory (a translated ``torch.OutOfMemoryError``)."""


class ForwardError(GpuError):
    """A model failed while answering a request."""


class CheckpointFormatError(LoadFailedError, ModelSpecError):
    """A weight file is not a readable safetensors file (truncated, corrupt, an unknown dtype).

    Both a load error (the loader cannot read it) and a spec error (planning cannot size it): each side catches
    the kind it handles.
    """
