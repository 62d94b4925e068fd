"""Byte and time units, their human renderings, and the bytes per element of each dtype."""

from __future__ import annotations

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


DTYPE_BYTES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1}
"""Bytes per element of the dtypes the fleet plans and serves in (the one table; planning and runtime use it)."""


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
