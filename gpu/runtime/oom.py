"""Translating device out-of-memory errors, once, at the boundary where they happen."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from gpu.errors import DeviceOutOfMemoryError


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is a device out-of-memory error (torch's class or its message)."""
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is present wherever this runs
        pass
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


@contextmanager
def translate_oom(what: str) -> Iterator[None]:
    """Turn a CUDA OOM raised inside the block into :class:`DeviceOutOfMemoryError` naming ``what``."""
    try:
        yield
    except Exception as exc:
        if is_oom(exc):
            raise DeviceOutOfMemoryError(f"device ran out of memory while {what}: {exc}") from exc
        raise
