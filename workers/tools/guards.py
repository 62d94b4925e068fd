"""Turn the failures of writing generated models into :class:`gpufleet.gpu.errors.ConfigError` with advice.

Shared by the checkpoint builder, the tokenizer and the demo models: a missing worker library or an
unwritable directory is a setup problem the caller can fix, so it surfaces as a configuration error that
says how, never as a bare ``ImportError`` or ``OSError``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gpufleet.gpu.errors import ConfigError, GpuError

WRITE_ADVICE = "check that the directory is writable and has space"


@contextmanager
def needs_worker_libraries(what: str) -> Iterator[None]:
    """Inside the block, an ``ImportError`` becomes a ``ConfigError`` naming the missing library.

    Args:
        what: the work that needs the libraries, for the message (``"making demo models"``).

    Raises:
        ConfigError: torch, transformers or tokenizers (or another import) is missing.
    """
    try:
        yield
    except ImportError as exc:
        raise ConfigError(
            f"{what} needs the worker libraries ({exc.name or exc}); install them with `pip install 'gpufleet[worker]'`"
        ) from exc


@contextmanager
def writing(path: Path, what: str, *, advice: str = WRITE_ADVICE) -> Iterator[None]:
    """Inside the block, an ``OSError`` becomes a ``ConfigError`` naming ``what`` and ``path``.

    Args:
        path: the directory being written.
        what: what is being written, for the message (``"tiny llama checkpoint"``).
        advice: what the reader should do about it.

    Raises:
        ConfigError: the block raised an ``OSError``; gpufleet's own errors pass through unchanged.
    """
    try:
        yield
    except GpuError:
        raise
    except OSError as exc:
        raise ConfigError(f"could not write {what} to {path}: {exc}; {advice}") from exc
