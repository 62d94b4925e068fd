"""The `gpufleet` command line, run as a user would."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
from celery import Celery
from celery.result import AsyncResult

from gpufleet.gpu.plan.selection import plan
from gpufleet.tasks.contracts import REROUTED, Rerouted
from gpufleet.tasks.errors import FleetError
from gpufleet.tasks.planning import placement_for
from gpufleet.tasks.settings import get_settings, load_settings
from gpufleet.workers.cli import _wait, build_parser, load_progress, main
from gpufleet.workers.tools.launch import gpufleet_command
from gpufleet.workers.tools.local_redis import LocalRedis, free_port


def test_plan_json_is_the_placement_and_its_queue(capsys: pytest.CaptureFixture[str]) -> None:
    # That plan needs no torch is checked at run time by tests/unit/test_import_boundaries.py.
    assert main(["plan", "meta-llama/Llama-3.1-70B-Instruct", "--json"]) == 0
    placement = json.loads(capsys.readouterr().out)
    # The field names are pinned in tests/unit/gpu/plan/test_selection.py; the CLI prints the Placement and its queue.
    queue = placement.pop("queue")
    assert placement == json.loads(json.dumps(plan("meta-llama/Llama-3.1-70B-Instruct").to_dict()))
    assert queue == f"gpu.{placement['gpu_type']}"


def test_plan_names_the_type_the_router_would(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GPUFLEET_FLEET__GPU_TYPES", "h100,l4")
    assert main(["plan", "openai-community/gpt2", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    routed = placement_for("openai-community/gpt2", load_settings())
    assert (shown["gpu_type"], shown["queue"]) == (routed.gpu_type, "gpu.l4")
    assert main(["plan", "openai-community/gpt2"]) == 0
    table = capsys.readouterr().out
    assert "gpu.l4" in table and "h100, l4 (GPUFLEET_FLEET__GPU_TYPES)" in table
    # The catalog view, for an operator sizing a fleet: the cheapest type anywhere.
    assert main(["plan", "openai-community/gpt2", "--all-types", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gpu_type"] == "t4"


def test_plan_of_a_model_not_installed_says_so_and_plans_from_the_name(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("GPUFLEET_MODEL_ROOT", str(tmp_path))
    monkeypatch.setenv("GPUFLEET_HF_CACHE", str(tmp_path / "hf"))
    assert main(["plan", "openai-community/gpt2", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["gpu_type"] == "t4"
    assert "not installed" in captured.err and "gpufleet models make-demo" in captured.err


def test_a_comma_separated_nested_list_setting_does_not_crash(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GPUFLEET_GPU__WARMUP__OPERATIONS", "matmul,memory")
    assert main(["plan", "openai-community/gpt2"]) == 0
    monkeypatch.setenv("GPUFLEET_GPU__WARMUP__OPERATIONS", "[matmul")
    get_settings.cache_clear()
    assert main(["plan", "openai-community/gpt2"]) == 1
    assert "SettingsError" in capsys.readouterr().err


def test_bench_help_is_the_benchmarks_own(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: gpufleet bench") and "--repeats" in out and "--size" in out
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--no-such-option"])
    assert exited.value.code == 2


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_status_with_the_broker_down_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GPUFLEET_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("GPUFLEET_BROKER__PUBLISH_MAX_RETRIES", "0")
    assert main(["status", "--timeout", "0.2"]) == 1
    err = _one_line_error(capsys)
    assert "BrokerUnavailableError" in err and "did not answer" in err and "GPUFLEET_BROKER_URL" in err


@pytest.mark.parametrize("command", [["status", "--timeout", "0.2"], ["load", "org/model-0.1B"]])
def test_a_wrong_password_is_reported_as_authentication(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], redis_server: LocalRedis, command: list[str]
) -> None:
    monkeypatch.setenv("GPUFLEET_BROKER_URL", f"redis://:wrong@127.0.0.1:{redis_server.port}/0")
    monkeypatch.setenv("GPUFLEET_RESULT_BACKEND", f"redis://:wrong@127.0.0.1:{redis_server.port}/1")
    monkeypatch.setenv("GPUFLEET_BROKER__PUBLISH_MAX_RETRIES", "0")
    monkeypatch.setenv("GPUFLEET_FLEET__GPU_TYPES", "cpu")
    assert main(command) == 1
    err = _one_line_error(capsys)
    assert "BrokerAuthenticationError" in err and "authentication" in err and "did not answer" not in err
    assert "check the password in GPUFLEET_" in err and ":wrong@" not in err


def _json_app(redis_server: LocalRedis) -> Celery:
    """A Celery app on the test Redis that stores results as JSON, as the fleet's does."""
    app = Celery("cli-test", backend=redis_server.url(41), broker=redis_server.url(40))
    app.conf.update(result_serializer="json", accept_content=["json"], result_accept_content=["json"])
    return app


def test_a_finished_job_is_never_drawn_as_load_progress(
    redis_server: LocalRedis, capsys: pytest.CaptureFixture[str]
) -> None:
    app = _json_app(redis_server)
    job = AsyncResult(str(uuid.uuid4()), app=app)
    app.backend.store_result(job.id, {"bytes_done": 3 * 2**20, "bytes_total": 12 * 2**20}, "PROGRESS")
    assert load_progress(job) == (3 * 2**20, 12 * 2**20)
    # The job finishes: its result (no byte counts) must not become a "0/0 MiB" bar, as it did when the state
    # and the progress were read one after the other.
    app.backend.store_result(job.id, {"model": "m", "action": "loaded"}, "SUCCESS")
    assert load_progress(job) is None
    assert _wait(job, timeout_s=5.0, progress=True) == {"model": "m", "action": "loaded"}
    assert capsys.readouterr().err == ""  # no bar and no stray newline after a job that showed no progress
    app.close()


def test_a_rerouted_job_says_where_it_went_instead_of_a_stale_bar(
    redis_server: LocalRedis, capsys: pytest.CaptureFixture[str]
) -> None:
    app = _json_app(redis_server)
    job = AsyncResult(str(uuid.uuid4()), app=app)
    # The first attempt's load progress, then its worker ran out of memory and re-sent the job.
    app.backend.store_result(job.id, {"bytes_done": 12 * 2**20, "bytes_total": 12 * 2**20}, "PROGRESS")
    moved = Rerouted(rerouted_to="cpu.cpu-e@x", reason="out of memory on cpu-d@x", worker="cpu-d@x", at=1.0)
    app.backend.store_result(job.id, moved.model_dump(), REROUTED)
    assert load_progress(job) is None, "no stale bar for the attempt that gave the job away"
    with pytest.raises(FleetError) as raised:
        _wait(job, timeout_s=0.5, progress=True)
    message = str(raised.value)
    assert "re-sent by cpu-d@x to queue 'cpu.cpu-e@x': out of memory on cpu-d@x" in message
    assert "still running" not in message
    err = capsys.readouterr().err
    assert err.count(f"job {job.id} was re-sent by cpu-d@x to queue 'cpu.cpu-e@x'") == 1, "said once"
    assert "loading [" not in err
    app.close()


def test_plan_table_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "Qwen/Qwen2.5-7B-Instruct", "--context-length", "8192"]) == 0
    table = capsys.readouterr().out
    assert "gpu" in table.lower()
    assert main(["plan", "mystery-model"]) == 1
    err = capsys.readouterr().err
    assert "RoutingError" in err and "mystery-model" in err and "GPUFLEET_MODEL_ROOT" in err


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
    from gpufleet.workers.tools.local_redis import free_port

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
