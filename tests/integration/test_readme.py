"""The README's snippets, run as a reader would run them, against a real Redis and a `gpufleet worker --cpu`.

Every ``bash`` and ``python`` block of README.md runs (``tests/support/readme.py`` finds them), unless the line
above it is a skip marker saying why it cannot run offline on a CPU machine::

    <!-- readme-test: skip: needs a GPU -->

So a snippet someone adds later is run too, or says why not. Each runs in a fresh process with the environment a
reader would have after following the README: ``GPUFLEET_BROKER_URL``, ``GPUFLEET_RESULT_BACKEND`` and
``GPUFLEET_MODEL_ROOT`` pointing at the test's Redis and demo models, and gpufleet's ``bin`` directory first on
``PATH``. What a reader would replace by their own is replaced (:data:`STAND_INS`), and ``pip`` runs with
``PIP_NO_INDEX=1``: it may check that an extra is installed, never download one. A bash snippet runs with
``set -e -o pipefail``; whatever it leaves running in the background (``gpufleet api &``) is stopped after it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet.workers.tools.local_redis import free_port
from tests.integration.conftest import RunningWorker, WorkerFactory
from tests.support.readme import Snippet, readme_snippets

REPO = Path(__file__).resolve().parents[2]
SNIPPET_TIMEOUT_S = 240.0

STAND_INS = {
    # The plain Celery client's URLs (a reader writes their own password, host and databases).
    "redis://:PASSWORD@127.0.0.1:6379/0": "{broker_url}",
    "redis://:PASSWORD@127.0.0.1:6379/1": "{result_backend}",
    # The API's port: 8000 may be taken on a shared machine.
    "127.0.0.1:8000": "127.0.0.1:{api_port}",
    "--port 8000": "--port {api_port}",
}
"""README text -> what the doc test runs instead; ``{...}`` are filled from the test's fleet."""


@pytest.fixture(scope="module")
def fleet(module_worker_factory: WorkerFactory) -> RunningWorker:
    return module_worker_factory()


@pytest.fixture(scope="module")
def reader_env(fleet: RunningWorker) -> dict[str, str]:
    """A reader's environment: theirs (no GPUFLEET_* of this process), plus what the README tells them to set."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("GPUFLEET_")}
    for key in ("GPUFLEET_BROKER_URL", "GPUFLEET_RESULT_BACKEND", "GPUFLEET_MODEL_ROOT"):
        env[key] = fleet.env[key]
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PIP_NO_INDEX"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _stand_ins(code: str, fleet: RunningWorker, api_port: int) -> str:
    values = {
        "broker_url": fleet.env["GPUFLEET_BROKER_URL"],
        "result_backend": fleet.env["GPUFLEET_RESULT_BACKEND"],
        "api_port": str(api_port),
    }
    for text, replacement in STAND_INS.items():
        code = code.replace(text, replacement.format(**values))
    return code


@contextlib.contextmanager
def _process_group(command: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` in a process group of its own, stopping whatever it leaves running when done."""
    with log.open("wb") as out:
        # Output to a file, not a pipe: a background child would hold a pipe open and the wait would never end.
        process = subprocess.Popen(
            command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield process
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=10)


@pytest.mark.parametrize("snippet", readme_snippets(), ids=lambda snippet: snippet.name)
def test_readme_snippet_runs(
    snippet: Snippet, fleet: RunningWorker, reader_env: dict[str, str], tmp_path: Path
) -> None:
    if snippet.skip is not None:
        pytest.skip(f"{snippet.name}: {snippet.skip}")
    code = _stand_ins(snippet.code, fleet, free_port())
    script = tmp_path / ("snippet.sh" if snippet.language == "bash" else "snippet.py")
    script.write_text(code, encoding="utf-8")
    command = (
        ["bash", "-e", "-o", "pipefail", str(script)] if snippet.language == "bash" else [sys.executable, str(script)]
    )
    log = tmp_path / "output.log"
    with _process_group(command, reader_env, log) as process:
        try:
            returncode = process.wait(timeout=SNIPPET_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            returncode = None
    output = log.read_text(encoding="utf-8", errors="replace")
    ran = f"{snippet.name} as run:\n{code}\n--- its output ---\n{output[-6000:]}\n--- worker log: {fleet.log_path}"
    assert returncode is not None, f"still running after {SNIPPET_TIMEOUT_S:g} s: {ran}"
    assert returncode == 0, f"exit status {returncode}: {ran}"
