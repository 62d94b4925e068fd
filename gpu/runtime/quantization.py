"""Quantized checkpoints: can this device run them? Checked from config.json before any weight is read.

A checkpoint whose ``config.json`` has a ``quantization_config`` (GPTQ, AWQ, bitsandbytes, FP8,
compressed-tensors, MXFP4) runs through transformers' quantizer for its method, which needs CUDA kernels from an
extra package and, for some methods, a recent GPU. Without them transformers fails late (after reading weights)
or, worse, silently dequantizes. :func:`check_quantized` refuses early instead, naming what is missing and the
``gpufleet`` extra that installs it. The import check uses ``importlib.util.find_spec``: nothing is imported,
and CUDA is asked only for the compute capability of the device the worker already serves on.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpufleet.gpu.errors import ModelSpecError, UnsupportedQuantizationError

__all__ = [
    "PIP_NAMES",
    "QUANT_REQUIREMENTS",
    "QuantRequirement",
    "check_quantized",
    "device_capability",
    "quant_method",
]


@dataclass(frozen=True)
class QuantRequirement:
    """What serving one quantization method needs.

    Attributes:
        method: the ``quant_method`` as transformers writes it.
        modules: Python modules that must be importable; each entry lists alternatives, any one of which will do.
        extra: the gpufleet extra that installs them (``pip install 'gpufleet[extra]'``), when there is one.
        min_capability: the oldest CUDA compute capability its kernels run on.
    """

    method: str
    modules: tuple[tuple[str, ...], ...]
    extra: str | None
    min_capability: tuple[int, int]


# The pip package of each module where the names differ.
PIP_NAMES: Mapping[str, str] = {
    "awq": "autoawq",
    "compressed_tensors": "compressed-tensors",
    "fbgemm_gpu": "fbgemm-gpu",
}

# What transformers' quantizer for each method checks, moved before the load. Compute capabilities: GPTQ's and
# AWQ's GEMM kernels (gptqmodel's ExLlama/Marlin) and MXFP4's triton kernels need Turing (7.5); bitsandbytes'
# int8/nf4 kernels run from Volta (7.0) in the builds published for current torch; FP8 tensor cores arrive with
# Ada (8.9); compressed-tensors' INT8/FP8 schemes need Ampere (8.0). transformers 5 runs AWQ through gptqmodel,
# transformers 4 through autoawq (module ``awq``).
QUANT_REQUIREMENTS: Mapping[str, QuantRequirement] = {
    "gptq": QuantRequirement("gptq", (("optimum",), ("gptqmodel",)), "quant-gptq", (7, 5)),
    "awq": QuantRequirement("awq", (("gptqmodel", "awq"),), "quant-awq", (7, 5)),
    "bitsandbytes": QuantRequirement("bitsandbytes", (("bitsandbytes",),), "quant-bnb", (7, 0)),
    "fp8": QuantRequirement("fp8", (), None, (8, 9)),
    "fbgemm_fp8": QuantRequirement("fbgemm_fp8", (("fbgemm_gpu",),), None, (8, 9)),
    "compressed-tensors": QuantRequirement("compressed-tensors", (("compressed_tensors",),), "quant-ct", (8, 0)),
    "mxfp4": QuantRequirement("mxfp4", (("triton",), ("kernels",)), "quant-mxfp4", (7, 5)),
}


def quant_method(path: Path) -> str | None:
    """The ``quantization_config.quant_method`` of the checkpoint in ``path`` (lower case), or ``None``.

    Raises:
        ModelSpecError: the config.json exists but cannot be read.
    """
    from gpufleet.gpu.plan.checkpoint_files import read_config  # cached: planning already parsed it

    config_path = path / "config.json"
    if not config_path.is_file():
        return None
    config = read_config(config_path)
    qc: Any = config.get("quantization_config")
    if not isinstance(qc, Mapping):
        text = config.get("text_config")
        qc = text.get("quantization_config") if isinstance(text, Mapping) else None
    if not isinstance(qc, Mapping):
        return None
    method = qc.get("quant_method")
    return str(method).lower() if method else "unknown"


def device_capability(device: str) -> tuple[int, int] | None:
    """The CUDA compute capability of ``device``; ``None`` for a CPU (or any non-CUDA) device."""
    if not device.startswith("cuda"):
        return None
    import torch

    major, minor = torch.cuda.get_device_capability(torch.device(device))
    return int(major), int(minor)


def check_quantized(
    model_id: str,
    path: Path,
    device: str,
    *,
    capability: Callable[[str], tuple[int, int] | None] = device_capability,
    has_module: Callable[[str], bool] | None = None,
) -> str | None:
    """Refuse a quantized checkpoint this device cannot run, before any weight is read.

    Args:
        model_id: the id, for messages.
        path: the model directory (only ``config.json`` is read).
        device: the torch device the worker serves on.
        capability: the compute capability of a device (``None`` for CPU); tests pass their own.
        has_module: whether a module is importable; default ``importlib.util.find_spec``.

    Returns:
        The quantization method when the checkpoint is quantized and can run here; ``None`` when unquantized.

    Raises:
        UnsupportedQuantizationError: the device is a CPU, its compute capability is too old, or a kernel
            package is missing; the message names what is missing and how to get it.
        LoadFailedError: the config.json cannot be read.
    """
    try:
        method = quant_method(path)
    except ModelSpecError as exc:
        from gpufleet.gpu.errors import LoadFailedError

        raise LoadFailedError(f"{exc}; the model directory is incomplete or corrupt") from exc
    if method is None:
        return None
    requirement = QUANT_REQUIREMENTS.get(method) or QUANT_REQUIREMENTS.get(method.replace("_", "-"))
    where = f"{model_id!r} is a {method}-quantized checkpoint"
    cc = capability(device)
    if cc is None:
        raise UnsupportedQuantizationError(
            f"{where}; {method} weights need CUDA kernels and this worker serves on {device}: route it to a GPU "
            "worker (the planner never places quantized checkpoints other than GGUF on CPU), or serve an "
            "unquantized or GGUF variant on CPU"
        )
    if requirement is None:
        return method  # a method we have no table entry for: transformers' own quantizer checks its environment
    if cc < requirement.min_capability:
        need = ".".join(map(str, requirement.min_capability))
        raise UnsupportedQuantizationError(
            f"{where}; its kernels need compute capability {need} or later and {device} has {cc[0]}.{cc[1]}: "
            f"route it to a newer GPU type, or serve an unquantized variant here"
        )
    present = has_module or (lambda name: importlib.util.find_spec(name) is not None)
    missing = [
        " or ".join(PIP_NAMES.get(module, module) for module in alternatives)
        for alternatives in requirement.modules
        if not any(present(module) for module in alternatives)
    ]
    if missing:
        install = (
            f"pip install 'gpufleet[{requirement.extra}]'"
            if requirement.extra
            else f"pip install {PIP_NAMES.get(requirement.modules[0][0], requirement.modules[0][0])}"
        )
        raise UnsupportedQuantizationError(
            f"{where}; this worker lacks {', '.join(missing)}, which transformers needs to run it: install it "
            f"on the worker image ({install}) and restart the worker"
        )
    return method
