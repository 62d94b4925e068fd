"""Starting workers as separate processes, exactly as the README does (``gpufleet worker ...``).

Used by ``gpufleet demo`` and the integration tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gpufleet.workers.errors import WorkerStartError


def gpufleet_command() -> list[str]:
    """The ``gpufleet`` console script, or ``python -m workers.cli`` when it is not on PATH."""
    script = shutil.which("gpufleet") or str(Path(sys.executable).with_name("gpufleet"))
    if Path(script).exists():
        return [script]
    return [sys.executable, "-m", "gpufleet.workers.cli"]


def spawn_worker(
    env: dict[str, str], log_path: Path, *, gpu: int | None = None, name: str | None = None
) -> subprocess.Popen[bytes]:
    """Start ``gpufleet worker --cpu`` (or ``--gpu N``) with ``env`` added, logging to ``log_path``."""
    command = [*gpufleet_command(), "worker", *(["--gpu", str(gpu)] if gpu is not None else ["--cpu"])]
    if name:
        command += ["--name", name]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # The child keeps its own copy of the descriptor; ours is closed when Popen returns.
    with log_path.open("ab") as log_file:
        # A new session, so stopping it (and its pool child) never signals the caller.
        return subprocess.Popen(
            command, env={**os.environ, **env}, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_until_ready(
    client: Any, worker: str, process: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 180.0
) -> dict[str, Any]:
    """Poll ``gpu_status`` until ``worker`` reports ready (warm, consuming its queues).

    Raises:
        WorkerStartError: the worker exited or did not become ready in time (with the end of its log).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise WorkerStartError(f"worker exited with {process.returncode}:\n{tail(log_path)}")
        status = client.status("gpu_status", timeout_s=1.0).get(worker)
        if status and status.get("ready") and _consuming(client, worker, status.get("queues", [])):
            return dict(status)
        time.sleep(0.2)
    raise WorkerStartError(f"worker {worker} was not ready after {timeout_s:g} s:\n{tail(log_path)}")


def _consuming(client: Any, worker: str, queues: list[str]) -> bool:
    active = client.app.control.inspect(destination=[worker], timeout=1.0).active_queues() or {}
    names = {queue["name"] for queue in active.get(worker, [])}
    return set(queues) <= names


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    """Warm shutdown (SIGTERM to the worker's process group), then SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    try:
        _signal(process, signal.SIGTERM)
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _signal(process, signal.SIGKILL)
        process.wait()


def _signal(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """``sig`` to the process's group, or to the process alone when it leads none (started without a session of
    its own): a group signal would then reach nothing, and the wait after it would never end."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        process.send_signal(sig)


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"
