"""Failures of a running model, translated once where they happen; and a way to cause real ones on purpose.

Every place a model runs (inference, warm-up, loading) wraps the library call in :func:`translate_oom` or
:func:`translate_model_errors`, so what leaves :mod:`gpufleet.gpu.runtime` is a :mod:`gpufleet.gpu.errors` class: a
device out-of-memory becomes :class:`~gpufleet.gpu.errors.DeviceOutOfMemoryError` (the worker evicts and retries, or
re-routes), and any other failure of torch, transformers or tokenizers inside a forward becomes
:class:`~gpufleet.gpu.errors.ForwardError`. Our own errors pass through unchanged.

:func:`inject_oom_on_forward` arms a forward pre-hook on a real module so its next forwards raise a real
``torch.OutOfMemoryError``: the tests and the worker's fault injection exercise the same path a full device takes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from gpufleet.gpu.errors import ConfigError, DeviceOutOfMemoryError, ForwardError, GpuError

if TYPE_CHECKING:
    import torch
    from torch.utils.hooks import RemovableHandle

__all__ = [
    "MODEL_LIBRARY_ERRORS",
    "OOM_ADVICE",
    "inject_forward_error",
    "inject_oom_on_forward",
    "is_oom",
    "translate_model_errors",
    "translate_oom",
]

OOM_ADVICE = (
    "unload or evict models (unpinned ones go first), lower the batch size or max_new_tokens, or route the model "
    "to a GPU with more memory"
)

# What torch, transformers and tokenizers raise when a forward or a generation fails on its inputs or state.
# Anything else (KeyboardInterrupt, OSError, a bug of ours) is not a failure of the model and is not hidden.
MODEL_LIBRARY_ERRORS: tuple[type[Exception], ...] = (RuntimeError, ValueError, IndexError, TypeError)

INJECTED_OOM_MESSAGE = "CUDA out of memory. Tried to allocate 2.00 GiB (injected by gpufleet)"


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is a device out-of-memory error (torch's class or its message)."""
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is present wherever this runs
        pass
    # cuBLAS and some kernels report a full device as a plain RuntimeError ("CUDA error: out of memory").
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _oom_error(what: str, exc: BaseException) -> DeviceOutOfMemoryError:
    return DeviceOutOfMemoryError(f"device ran out of memory while {what}: {exc}; {OOM_ADVICE}")


@contextmanager
def translate_oom(what: str) -> Iterator[None]:
    """Turn a device out-of-memory raised inside the block into :class:`DeviceOutOfMemoryError`.

    Other exceptions pass unchanged: use this where failures other than a full device have their own
    translation (the loaders turn file errors into ``LoadFailedError``).

    Args:
        what: what was going on, for the message ("loading org/model").

    Raises:
        DeviceOutOfMemoryError: the device ran out of memory inside the block (``__cause__`` is torch's error).
    """
    try:
        yield
    except GpuError:
        raise
    except Exception as exc:
        if is_oom(exc):
            raise _oom_error(what, exc) from exc
        raise


@contextmanager
def translate_model_errors(model_id: str, doing: str, advice: str) -> Iterator[None]:
    """Translate a failure of ``model_id`` while it runs inside the block.

    Args:
        model_id: the model that runs.
        doing: what it was doing, for the message ("embedding 3 texts").
        advice: what to do when the model fails on its inputs (not used for out-of-memory).

    Raises:
        DeviceOutOfMemoryError: the device ran out of memory (``__cause__`` is torch's error).
        ForwardError: torch, transformers or tokenizers raised one of :data:`MODEL_LIBRARY_ERRORS`.
        GpuError: any of ours, raised inside the block, unchanged.
    """
    try:
        yield
    except GpuError:
        raise
    except Exception as exc:
        if is_oom(exc):
            raise _oom_error(f"{doing} with {model_id!r}", exc) from exc
        if isinstance(exc, MODEL_LIBRARY_ERRORS):
            raise ForwardError(
                f"model {model_id!r} failed while {doing}: {type(exc).__name__}: {exc}; {advice}"
            ) from exc
        raise


def inject_forward_error(
    module: torch.nn.Module, make_error: Callable[[], BaseException], calls: int
) -> RemovableHandle:
    """Make the next ``calls`` forward passes of ``module`` raise ``make_error()``, then behave normally again.

    The error is raised by a forward pre-hook on the real module, so it surfaces from inside the library call
    (``module(...)``, ``module.generate(...)``) exactly where a real failure would. The hook removes itself after
    the last injected failure; removing it earlier through the returned handle disarms it.

    Args:
        module: the torch module (``LoadedModel.module``).
        make_error: builds the exception each armed call raises.
        calls: how many forward passes fail; at least 1.

    Returns:
        The hook's handle (``handle.remove()`` disarms it; removing twice is harmless).

    Raises:
        ConfigError: ``calls`` is less than 1.
    """
    if calls < 1:
        raise ConfigError(f"calls must be at least 1 to inject a forward error, got {calls}")
    remaining = calls

    def fail(_module: torch.nn.Module, _args: Any) -> None:
        nonlocal remaining
        remaining -= 1
        if remaining <= 0:
            handle.remove()  # torch iterates over a copy of the hooks, so removing during the call is safe
        raise make_error()

    handle = module.register_forward_pre_hook(fail)
    return handle


def inject_oom_on_forward(module: torch.nn.Module, calls: int) -> RemovableHandle:
    """Make the next ``calls`` forward passes of ``module`` raise a real ``torch.OutOfMemoryError``.

    Args:
        module: the torch module (``LoadedModel.module``).
        calls: how many forward passes fail; at least 1.

    Returns:
        The hook's handle (``handle.remove()`` disarms it early).

    Raises:
        ConfigError: ``calls`` is less than 1.
    """
    import torch

    return inject_forward_error(module, lambda: torch.OutOfMemoryError(INJECTED_OOM_MESSAGE), calls)
