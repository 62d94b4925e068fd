"""Byte and time units, their human renderings, and the one table of element types (dtypes)."""

from __future__ import annotations

from dataclasses import dataclass

from gpufleet.gpu.errors import ConfigError

KiB = 1024
MiB = 1024**2
GiB = 1024**3
GB = 1000**3


def fmt_bytes(n_bytes: float) -> str:
    """Render a byte count for a person: ``38.2 GiB``, ``512.0 MiB``."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Dtype:
    """One element type: its bytes, its torch name, and its name in safetensors headers."""

    bytes: int
    torch_name: str | None  # the attribute of torch (``torch.bfloat16``); None where torch has no such type
    safetensors: str | None = None  # the format's own code ("BF16")
    floating: bool = False
    served: bool = False  # a dtype models are served in (``GPUFLEET_GPU__PRECISION``)


DTYPES: dict[str, Dtype] = {
    "float32": Dtype(4, "float32", "F32", floating=True, served=True),
    "float16": Dtype(2, "float16", "F16", floating=True, served=True),
    "bfloat16": Dtype(2, "bfloat16", "BF16", floating=True, served=True),
    "float64": Dtype(8, "float64", "F64", floating=True),
    "fp8": Dtype(1, None),  # planning only: FP8 checkpoints and KV caches
    "float8_e4m3fn": Dtype(1, "float8_e4m3fn", "F8_E4M3"),
    "float8_e5m2": Dtype(1, "float8_e5m2", "F8_E5M2"),
    "float8_e8m0fnu": Dtype(1, "float8_e8m0fnu", "F8_E8M0"),
    "int64": Dtype(8, "int64", "I64"),
    "int32": Dtype(4, "int32", "I32"),
    "int16": Dtype(2, "int16", "I16"),
    "int8": Dtype(1, "int8", "I8"),
    "uint64": Dtype(8, "uint64", "U64"),
    "uint32": Dtype(4, "uint32", "U32"),
    "uint16": Dtype(2, "uint16", "U16"),
    "uint8": Dtype(1, "uint8", "U8"),
    "bool": Dtype(1, "bool", "BOOL"),
}
"""Every element type the fleet reads, plans or serves in: the one dtype table (planning, loading, warm-up)."""

SERVED_DTYPES: tuple[str, ...] = tuple(name for name, dtype in DTYPES.items() if dtype.served)
SAFETENSORS_DTYPES: dict[str, str] = {d.safetensors: name for name, d in DTYPES.items() if d.safetensors}
"""safetensors code ("BF16") → the table's name ("bfloat16")."""


def torch_name_of_code(code: str) -> str:
    """torch's attribute name for a safetensors code (``"BF16"`` → ``"bfloat16"``).

    Raises:
        ConfigError: a code the table does not know, or one torch has no type for.
    """
    dtype = DTYPES.get(SAFETENSORS_DTYPES.get(code, ""))
    if dtype is None or dtype.torch_name is None:
        raise ConfigError(f"safetensors dtype {code!r} has no torch type in gpufleet's dtype table")
    return dtype.torch_name


DTYPE_BYTES: dict[str, int] = {name: d.bytes for name, d in DTYPES.items() if d.served or name == "fp8"}
"""Bytes per element of the dtypes the fleet plans and serves in (from :data:`DTYPES`)."""


def dtype_bytes(name: str) -> int:
    """Bytes per element of the dtype ``name``.

    Args:
        name: ``"float32"``, ``"float16"``, ``"bfloat16"`` or ``"fp8"``.

    Returns:
        The element size in bytes.

    Raises:
        ConfigError: ``name`` is not one of those dtypes.
    """
    try:
        return DTYPE_BYTES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}: use one of {', '.join(DTYPE_BYTES)}") from None
