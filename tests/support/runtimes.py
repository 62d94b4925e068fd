"""Real pool-child runtimes on the CPU, built the way the worker builds them (settings from keyword overrides)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpufleet.tasks.settings import Settings, load_settings
from gpufleet.workers.child.runtime import WorkerRuntime
from gpufleet.workers.common.identity import WorkerIdentity, cpu_identity


def cpu_settings(state_dir: Path, *, model_root: Path | None = None, **overrides: Any) -> Settings:
    """Settings for a test runtime: its own state directory, small warm-up, the given overrides merged in."""
    gpu = {"warmup": {"size": "small"}, **overrides.pop("gpu", {})}
    return load_settings(model_root=model_root, worker={"state_dir": state_dir}, gpu=gpu, **overrides)


def cpu_runtime(
    state_dir: Path,
    *,
    model_root: Path | None = None,
    identity: WorkerIdentity | None = None,
    start: bool = True,
    **overrides: Any,
) -> WorkerRuntime:
    """A CPU :class:`WorkerRuntime` named ``cpu-0@unit`` (warmed up and ready unless ``start=False``).

    Keyword arguments the runtime itself takes (``loader``, ``faults``, ``on_change``) go to it; the rest are
    settings overrides.
    """
    runtime_kwargs = {key: overrides.pop(key) for key in ("loader", "faults", "on_change") if key in overrides}
    settings = cpu_settings(state_dir, model_root=model_root, **overrides)
    runtime = WorkerRuntime(identity or cpu_identity(name="cpu-0@unit"), settings, **runtime_kwargs)
    if start:
        runtime.start()
    return runtime
