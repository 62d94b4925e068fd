"""Exact sizes from a checkpoint's safetensors headers, read without torch.

A ``.safetensors`` file starts with an 8-byte little-endian header length, then a JSON header naming every
tensor with its dtype, shape and byte range. Reading the headers alone (kilobytes, even for a 700 GB
checkpoint) gives the exact bytes of every tensor and the exact parameter count, quantized layouts included:
packed int32 GPTQ/AWQ weights, bitsandbytes' packed uint8, FP8 weights with their scales, MXFP4 blocks.

Parameters are logical weights: a packed tensor counts ``storage bits / quantized bits`` weights per element,
and quantization side tensors (scales, zero points, group indices, absmax, quant maps) count no parameters but
do count bytes, as stored; so do integer buffers saved beside unquantized weights (``position_ids``), which
are not parameters of the model transformers builds.

Pure Python: the producer-side router plans from headers without torch or the safetensors package.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpufleet.gpu.errors import ModelSpecError

__all__ = ["CheckpointWeights", "read_header", "weights_from_safetensors"]

# Bytes per element of each safetensors dtype (the format's own names). Sub-byte types are stored packed in
# uint8 or int32 by the quantizers, so they never appear here.
_ELEMENT_BYTES: Mapping[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}
_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})  # converted to the serving dtype at load time
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
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit


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


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of one safetensors file (tensor name -> dtype, shape, data_offsets; plus ``__metadata__``).

    Raises:
        ModelSpecError: the file cannot be read or is not a safetensors file.
    """
    try:
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ModelSpecError(f"{path} is too short for a safetensors file: re-download it")
            (length,) = struct.unpack("<Q", prefix)
            if length > _MAX_HEADER_BYTES:
                raise ModelSpecError(
                    f"{path} declares a {length}-byte header, over the format's 100 MiB limit: it is not a "
                    "safetensors file or is corrupt; re-download it"
                )
            raw = handle.read(length)
    except OSError as exc:
        raise ModelSpecError(f"cannot read {path}: {exc.strerror or exc}; check the path and permissions") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelSpecError(f"{path} has no valid safetensors JSON header: re-download the file") from None
    if not isinstance(header, dict) or len(raw) < length:
        raise ModelSpecError(f"{path} has a truncated or malformed safetensors header: re-download the file")
    return header


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
            if name == "__metadata__":
                continue
            dtype, elements, size = _tensor(path, name, entry)
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
                params += round(elements * _ELEMENT_BYTES[dtype] * 8 / quantized_bits)
            # Any other integer or boolean tensor is a buffer saved with the weights (BERT's position_ids,
            # attention masks): torch parameters are floating point, so it counts bytes, no parameters.
    dominant = max(float_elements, key=lambda d: float_elements[d]) if float_elements else None
    names = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float32"}
    return CheckpointWeights(
        files=len(files),
        tensor_bytes=tensor_bytes,
        params=params,
        float_params=float_params,
        fixed_bytes=fixed_bytes,
        dtype=names[dominant] if dominant else None,
    )


def _tensor(path: Path, name: str, entry: object) -> tuple[str, int, int]:
    """(dtype, elements, bytes) of one header entry, checked against its byte range."""
    if not isinstance(entry, Mapping):
        raise ModelSpecError(f"{path}: tensor {name!r} has a malformed header entry; re-download the file")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _ELEMENT_BYTES:
        raise ModelSpecError(
            f"{path}: tensor {name!r} has dtype {dtype!r}, which planning does not know; "
            f"known: {', '.join(_ELEMENT_BYTES)}"
        )
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ModelSpecError(f"{path}: tensor {name!r} has a malformed shape {shape!r}; re-download the file")
    elements = math.prod(shape)
    size = elements * _ELEMENT_BYTES[dtype]
    if isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets):
        size = offsets[1] - offsets[0]  # the stored range is the truth, whatever the shape says
    return dtype, elements, size
