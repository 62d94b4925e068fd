"""Exact sizes from a checkpoint's safetensors headers, read without torch.

A ``.safetensors`` file starts with an 8-byte little-endian header length, then a JSON header naming every
tensor with its dtype, shape and byte range. Reading the headers alone (kilobytes, even for a 700 GB
checkpoint) gives the exact bytes of every tensor and the exact parameter count, quantized layouts included:
packed int32 GPTQ/AWQ weights, bitsandbytes' packed uint8, FP8 weights with their scales, MXFP4 blocks.

Parameters are logical weights: a packed tensor counts ``storage bits / quantized bits`` weights per element,
and quantization side tensors (scales, zero points, group indices, absmax, quant maps) count no parameters but
do count bytes, as stored; so do integer buffers saved beside unquantized weights (``position_ids``), which
are not parameters of the model transformers builds.

Pure Python: the producer-side router plans from headers without torch or the safetensors package. The headers
are read by :func:`gpufleet.gpu.checkpoint_format.read_header`, the loader's reader too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gpufleet.gpu.checkpoint_format import read_header
from gpufleet.gpu.units import DTYPES, SAFETENSORS_DTYPES

__all__ = ["CheckpointWeights", "weights_from_safetensors"]

# Floating-point tensors are converted to the serving dtype at load time.
_FLOAT_DTYPES = frozenset(code for code, name in SAFETENSORS_DTYPES.items() if DTYPES[name].floating)
_PACKED_DTYPES = frozenset({"U8", "I8", "I32", "U32"})  # hold several quantized weights per element when quantized

# Name endings of quantization side tensors: bytes as stored, no parameters.
_SIDE_TENSOR_SUFFIXES = (
    ".scales",
    ".qzeros",
    ".g_idx",
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".SCB",
    ".weight_format",
    "_scale",
    "_scale_inv",
    "_zero_point",
    "_global_scale",
    ".weight_shape",
    "_scales",
    ".input_scale",
    ".output_scale",
    ".k_scale",
    ".v_scale",
)


@dataclass(frozen=True)
class CheckpointWeights:
    """What a checkpoint's safetensors headers say, summed over its files.

    Attributes:
        files: safetensors files read.
        tensor_bytes: bytes of every tensor, exactly as stored.
        params: logical parameters (packed weights unpacked; side tensors not counted).
        float_params: elements of floating-point tensors that are not quantization side tensors: these are
            converted to the serving dtype when loaded.
        fixed_bytes: bytes that load as stored whatever the serving dtype: quantized (packed, FP8) weights and
            every quantization side tensor.
        dtype: the floating-point dtype holding most elements (``bfloat16``, ``float16``, ``float32``), or
            ``None`` when the checkpoint has no floating-point tensors.
    """

    files: int
    tensor_bytes: int
    params: int
    float_params: int
    fixed_bytes: int
    dtype: str | None

    @property
    def files_text(self) -> str:
        """``1 file`` or ``3 files``, for why-strings."""
        return f"{self.files} file{'' if self.files == 1 else 's'}"

    def bytes_as_served(self, float_bytes: float | None) -> int:
        """Bytes once loaded with floating-point tensors at ``float_bytes`` each (``None``: as stored)."""
        if float_bytes is None:
            return self.tensor_bytes
        return math.ceil(self.float_params * float_bytes + self.fixed_bytes)


def weights_from_safetensors(files: Sequence[Path], *, quantized_bits: float | None = None) -> CheckpointWeights:
    """Sum the headers of ``files``.

    Args:
        files: the checkpoint's ``.safetensors`` files.
        quantized_bits: bits per quantized weight from the config's ``quantization_config`` (4 for GPTQ-4bit,
            MXFP4 and bnb-4bit); ``None`` for an unquantized checkpoint, whose integer tensors are buffers
            (bytes, no parameters).

    Returns:
        The summed sizes.

    Raises:
        ModelSpecError: a file is unreadable, or a header names an unknown dtype or a bad shape.
    """
    tensor_bytes = params = float_params = fixed_bytes = 0
    float_elements: dict[str, int] = {}
    for path in files:
        for name, entry in read_header(path).items():
            dtype, elements, size = entry.dtype, entry.elements, entry.nbytes
            tensor_bytes += size
            side = name.endswith(_SIDE_TENSOR_SUFFIXES)
            if dtype in _FLOAT_DTYPES and not side:
                float_params += elements
                params += elements
                float_elements[dtype] = float_elements.get(dtype, 0) + elements
                continue
            fixed_bytes += size
            if side:
                continue
            if dtype.startswith("F8"):  # FP8 weights: one parameter per element
                params += elements
            elif quantized_bits and dtype in _PACKED_DTYPES:
                params += round(elements * DTYPES[SAFETENSORS_DTYPES[dtype]].bytes * 8 / quantized_bits)
            # Any other integer or boolean tensor is a buffer saved with the weights (BERT's position_ids,
            # attention masks): torch parameters are floating point, so it counts bytes, no parameters.
    dominant = max(float_elements, key=lambda d: float_elements[d]) if float_elements else None
    return CheckpointWeights(
        files=len(files),
        tensor_bytes=tensor_bytes,
        params=params,
        float_params=float_params,
        fixed_bytes=fixed_bytes,
        dtype=_served_name(dominant) if dominant else None,
    )


def _served_name(code: str) -> str:
    """The served dtype a checkpoint's floating-point code stands for (float64 is served as float32)."""
    name = SAFETENSORS_DTYPES[code]
    return name if DTYPES[name].served else "float32"
