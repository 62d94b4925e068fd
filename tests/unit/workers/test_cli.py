"""The `gpufleet` command line, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gpu.plan.selection import plan
from workers.cli import build_parser, main
from workers.launch import gpufleet_command


def test_plan_json_works_without_torch() -> None:
    code = (
        "import importlib.abc, sys\n"
        "class B(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'torch', 'transformers', 'pynvml'}:\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, B())\n"
        "from workers.cli import main\n"
        "sys.exit(main(['plan', 'meta-llama/Llama-3.1-70B-Instruct', '--json']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    placement = json.loads(done.stdout)
    # The field names themselves are pinned in tests/unit/gpu/test_selection.py; the CLI prints exactly the Placement.
    assert placement == json.loads(json.dumps(plan("meta-llama/Llama-3.1-70B-Instruct").to_dict()))
    assert placement["queue"].startswith("gpu.")


def test_plan_table_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "Qwen/Qwen2.5-7B-Instruct", "--context-length", "8192"]) == 0
    table = capsys.readouterr().out
    assert "gpu" in table.lower()
    assert main(["plan", "mystery-model"]) == 1
    assert "ModelSpecError" in capsys.readouterr().err


def test_console_script_help() -> None:
    done = subprocess.run([*gpufleet_command(), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for command in ("worker", "submit", "load", "unload", "status", "plan", "models", "bench", "demo"):
        assert command in done.stdout


def test_worker_requires_a_device_flag() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker"])


def test_submit_with_no_broker_fails_clearly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from workers.local_redis import free_port

    port = free_port()
    monkeypatch.setenv("GPUFLEET_BROKER_URL", f"redis://127.0.0.1:{port}/0")
    monkeypatch.setenv("GPUFLEET_RESULT_BACKEND", f"redis://127.0.0.1:{port}/1")
    monkeypatch.setenv("GPUFLEET_BROKER__PUBLISH_MAX_RETRIES", "0")
    monkeypatch.setenv("GPUFLEET_FLEET__GPU_TYPES", "cpu")
    assert main(["submit", "embed", "org/model-0.1B", "hello"]) == 1
    assert "BrokerUnavailableError" in capsys.readouterr().err


def test_models_make_demo_and_list(tmp_path: object, capsys: pytest.CaptureFixture[str], model_root: object) -> None:
    assert main(["models", "list", str(model_root)]) == 0
    listed = capsys.readouterr().out.split()
    assert listed == ["gpufleet/tiny-chat", "sentence-transformers/all-MiniLM-L6-v2"]
