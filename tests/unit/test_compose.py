"""docker-compose.yml: valid for Compose, and it keeps what the README promises (AOF Redis with a password, Flower
behind auth, the fleet API behind a token, one worker per GPU, a CPU profile), and docs/prometheus.yml scrapes that API.

The structural checks read the YAML as Compose would before interpolation (anchors and ``<<`` merges resolved by
PyYAML) and always run. The Compose validation needs a ``docker-compose`` binary (Debian: ``apt-get install
--no-install-recommends docker-compose``) or the ``docker compose`` plugin; neither needs a running engine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpufleet.tasks.settings import JobLimits

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the project supports 3.10, whose stdlib has no tomllib
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
ENV_EXAMPLE = REPO / ".env.example"
PROMETHEUS_EXAMPLE = REPO / "docs" / "prometheus.yml"
SMOKE_OVERRIDE = REPO / "docker" / "compose.smoke.yml"
SMOKE_SCRIPT = REPO / "scripts" / "compose_smoke.sh"
BASE_IMAGE_SCRIPT = REPO / "scripts" / "local_base_image.sh"
README = REPO / "README.md"
TEST_ENV = {
    "REDIS_PASSWORD": "s3cret-for-tests",
    "FLOWER_USER": "admin",
    "FLOWER_PASSWORD": "flower-pw",
    "API_TOKEN": "api-token-for-tests",
}
PROFILES = ("cpu", "setup")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return [str(part) for part in command] if isinstance(command, list) else str(command).split()


def _workers(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if _command(s)[:2] == ["gpufleet", "worker"]}


def _option(command: list[str], flag: str) -> str | None:
    """The value of ``--flag value`` or ``--flag=value`` in a command list."""
    for i, part in enumerate(command):
        if part == flag and i + 1 < len(command):
            return command[i + 1]
        if part.startswith(flag + "="):
            return part.split("=", 1)[1]
    return None


def _seconds(duration: str) -> float:
    """A Compose duration (``6m``, ``1m30s``, ``400s``) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"unparsable duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _compose_tool() -> list[str] | None:
    binary = shutil.which("docker-compose")
    if binary:
        return [binary]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], check=False, capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def _run_compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    tool = _compose_tool()
    if tool is None:
        pytest.skip("no docker-compose binary or `docker compose` plugin on PATH (apt-get install docker-compose)")
    profiles = [arg for profile in PROFILES for arg in ("--profile", profile)]
    return subprocess.run(
        [*tool, "--project-directory", str(REPO), "-f", str(COMPOSE_FILE), *profiles, *args],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )


def _env(**extra: str) -> dict[str, str]:
    base = {key: value for key, value in os.environ.items() if key not in TEST_ENV}
    return {**base, **extra}


# --- Compose itself ---------------------------------------------------------------------------------------


def test_compose_config_is_valid() -> None:
    result = _run_compose("config", "-q", env=_env(**TEST_ENV))
    assert result.returncode == 0, result.stderr


def test_compose_interpolates_the_password_into_every_url() -> None:
    result = _run_compose("config", env=_env(**TEST_ENV))
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)["services"]
    password = TEST_ENV["REDIS_PASSWORD"]
    assert _option(_command(rendered["redis"]), "--requirepass") == password
    for name, service in rendered.items():
        env = service.get("environment") or {}
        if "GPUFLEET_BROKER_URL" in env:
            assert env["GPUFLEET_BROKER_URL"] == f"redis://:{password}@redis:6379/0", name
            assert env["GPUFLEET_RESULT_BACKEND"] == f"redis://:{password}@redis:6379/1", name
    auth = _option(_command(rendered["flower"]), "--basic-auth")
    assert auth == f"{TEST_ENV['FLOWER_USER']}:{TEST_ENV['FLOWER_PASSWORD']}"
    assert rendered["api"]["environment"]["GPUFLEET_API__TOKEN"] == TEST_ENV["API_TOKEN"]


def test_compose_refuses_to_start_without_a_redis_password() -> None:
    result = _run_compose("config", "-q", env=_env(FLOWER_USER="admin", FLOWER_PASSWORD="pw", API_TOKEN="t"))
    assert result.returncode != 0
    assert "REDIS_PASSWORD" in result.stderr


def test_compose_refuses_to_start_the_api_without_a_token() -> None:
    without = {key: value for key, value in TEST_ENV.items() if key != "API_TOKEN"}
    result = _run_compose("config", "-q", env=_env(**without))
    assert result.returncode != 0
    assert "API_TOKEN" in result.stderr


# --- Redis ------------------------------------------------------------------------------------------------


def test_redis_is_durable_and_password_protected(services: dict[str, dict[str, Any]]) -> None:
    command = _command(services["redis"])
    assert command[0] == "redis-server"
    assert _option(command, "--appendonly") == "yes"
    assert _option(command, "--appendfsync") == "everysec"
    assert _option(command, "--maxmemory-policy") == "noeviction"
    assert (_option(command, "--requirepass") or "").startswith("${REDIS_PASSWORD:?")


def test_redis_has_a_healthcheck_and_a_data_volume(compose: dict[str, Any], services: dict[str, Any]) -> None:
    redis = services["redis"]
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])
    assert any(str(volume).split(":")[1] == "/data" for volume in redis["volumes"])
    assert "redis-data" in compose["volumes"]


# --- Flower -----------------------------------------------------------------------------------------------


def test_flower_requires_basic_auth(services: dict[str, dict[str, Any]]) -> None:
    command = _command(services["flower"])
    assert command[:4] == ["celery", "--app", "gpufleet.tasks.app:app", "flower"]
    auth = _option(command, "--basic-auth") or _option(command, "--basic_auth")
    assert auth is not None, "flower must run with --basic-auth"
    # Both halves required (``:?``): Compose refuses to start Flower with an empty user or password.
    assert re.fullmatch(r"\$\{FLOWER_USER:\?[^}]*\}:\$\{FLOWER_PASSWORD:\?[^}]*\}", auth), auth


def test_flower_reads_the_model_volume_it_plans_from(services: dict[str, dict[str, Any]]) -> None:
    """Flower's send-task plans from the installed model and refuses one that is missing: it needs the volume."""
    flower = services["flower"]
    assert "models:/models:ro" in flower["volumes"]
    assert flower["environment"]["GPUFLEET_MODEL_ROOT"] == "/models"


def test_flower_flag_spelling_is_what_flower_accepts() -> None:
    flower_options = pytest.importorskip("flower.options")
    # tornado.options stores names with '-' and reads either spelling from the command line.
    assert "basic-auth" in flower_options.default_options._options


def test_flower_app_path_exists() -> None:
    import importlib

    module = importlib.import_module("gpufleet.tasks.app")
    assert hasattr(module, "app"), "the Flower command names tasks.app:app; expose a module-level `app`"


# --- the fleet API ----------------------------------------------------------------------------------------


def test_api_serves_on_all_container_interfaces_behind_a_token(services: dict[str, dict[str, Any]]) -> None:
    api = services["api"]
    command = _command(api)
    assert command[:2] == ["gpufleet", "api"]
    # Inside the container 127.0.0.1 would be unreachable from the published port.
    assert _option(command, "--host") == "0.0.0.0"
    assert _option(command, "--port") == "8000"
    # Token on by default: Compose refuses to start it with an empty or unset API_TOKEN.
    assert re.fullmatch(r"\$\{API_TOKEN:\?[^}]*\}", api["environment"]["GPUFLEET_API__TOKEN"])
    assert "profiles" not in api, "the API starts with a plain `docker compose up`"
    assert "deploy" not in api, "the API sends jobs and reads the registry: it needs no GPU"
    # /v1 lists the installed models and checks requests against their configs: the model volume, read-only.
    assert "models:/models:ro" in api["volumes"]


def test_api_is_published_on_loopback_by_default(services: dict[str, dict[str, Any]]) -> None:
    (port,) = services["api"]["ports"]
    assert str(port) == "${API_BIND:-127.0.0.1}:${API_PORT:-8000}:8000"


def test_api_healthcheck_uses_the_open_endpoint(services: dict[str, dict[str, Any]]) -> None:
    check = " ".join(services["api"]["healthcheck"]["test"])
    assert "http://127.0.0.1:8000/healthz" in check  # the one endpoint that answers without the token


def test_prometheus_example_scrapes_the_api_with_its_token(services: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load(PROMETHEUS_EXAMPLE.read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "gpufleet"]
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"]["type"] == "Bearer"
    assert job["authorization"]["credentials_file"], "the token comes from a file, never inline"
    (targets,) = [group["targets"] for group in job["static_configs"]]
    published = str(services["api"]["ports"][0]).rsplit(":", 1)[-1]
    assert all(target.rsplit(":", 1)[-1] == published for target in targets)


# --- workers ----------------------------------------------------------------------------------------------


def test_each_gpu_worker_reserves_one_distinct_nvidia_device(services: dict[str, dict[str, Any]]) -> None:
    gpu_workers = {name: s for name, s in _workers(services).items() if "--gpu" in _command(s)}
    assert len(gpu_workers) >= 2
    device_ids: list[str] = []
    for name, service in gpu_workers.items():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        (device,) = devices
        assert device["driver"] == "nvidia", name
        assert "gpu" in device["capabilities"], name
        assert "count" not in device, f"{name}: reserve by device_ids, not count"
        assert len(device["device_ids"]) == 1, name
        device_ids.append(str(device["device_ids"][0]))
        # The container sees only its reserved GPU, as index 0.
        assert _option(_command(service), "--gpu") == "0", name
    assert len(set(device_ids)) == len(device_ids), f"GPU workers share a device: {device_ids}"


def _enabled(services: dict[str, dict[str, Any]], profiles: set[str]) -> dict[str, dict[str, Any]]:
    """The services Compose starts with these profiles active: those without profiles, and those in one of them."""
    return {name: s for name, s in services.items() if not s.get("profiles") or profiles & set(s["profiles"])}


def _gpu_devices(services: dict[str, dict[str, Any]]) -> list[str]:
    return sorted(
        str(device_id)
        for service in _workers(services).values()
        if "--gpu" in _command(service)
        for device in service["deploy"]["resources"]["reservations"]["devices"]
        for device_id in device["device_ids"]
    )


def test_a_plain_up_starts_one_gpu_worker_as_a_one_gpu_host_has(services: dict[str, dict[str, Any]]) -> None:
    # Two by default asked a one-GPU host for device 1, which is not there.
    assert _gpu_devices(_enabled(services, set())) == ["0"]
    assert _gpu_devices(_enabled(services, {"cpu", "setup"})) == ["0"], "other profiles add no GPU worker"


@pytest.mark.parametrize("count", range(2, 9))
def test_the_gpu_worker_count_is_a_profile(services: dict[str, dict[str, Any]], count: int) -> None:
    # COMPOSE_PROFILES=gpusN (in .env or the environment): one worker per GPU 0 .. N-1.
    assert _gpu_devices(_enabled(services, {f"gpus{count}"})) == sorted(str(i) for i in range(count))
    assert _gpu_devices(_enabled(services, {f"gpus{count}", "cpu"})) == sorted(str(i) for i in range(count))


def test_env_example_and_readme_say_how_to_set_the_gpu_worker_count() -> None:
    assert re.search(r"^#?\s*COMPOSE_PROFILES=", ENV_EXAMPLE.read_text(), re.MULTILINE)
    assert "COMPOSE_PROFILES=gpus" in README.read_text()


def test_workers_have_distinct_hostnames(services: dict[str, dict[str, Any]]) -> None:
    hostnames = [s.get("hostname") for s in _workers(services).values()]
    assert all(hostnames), "worker names are <gpu-type>-<index>@<hostname>: every worker needs a hostname"
    assert len(set(hostnames)) == len(hostnames)


def test_cpu_worker_is_behind_the_cpu_profile(services: dict[str, dict[str, Any]]) -> None:
    cpu_workers = [s for s in _workers(services).values() if "--cpu" in _command(s)]
    assert len(cpu_workers) == 1
    (cpu,) = cpu_workers
    assert cpu["profiles"] == ["cpu"]
    assert "deploy" not in cpu


def test_every_worker_reads_the_shared_model_volume(services: dict[str, dict[str, Any]]) -> None:
    for name, service in _workers(services).items():
        assert "models:/models:ro" in service["volumes"], name
        assert service["environment"]["GPUFLEET_MODEL_ROOT"] == "/models", name


def test_worker_stop_grace_outlasts_the_hard_time_limit(services: dict[str, dict[str, Any]]) -> None:
    hard_limit_s = JobLimits().time_limit_s
    for name, service in _workers(services).items():
        assert _seconds(str(service["stop_grace_period"])) > hard_limit_s, name
        assert service.get("stop_signal", "SIGTERM") == "SIGTERM", name  # Celery's warm shutdown


def test_broker_urls_carry_the_password(services: dict[str, dict[str, Any]]) -> None:
    users = {
        name: s["environment"] for name, s in services.items() if "GPUFLEET_BROKER_URL" in s.get("environment", {})
    }
    assert set(_workers(services)) | {"flower", "api"} <= set(users)
    for name, env in users.items():
        for key, db in (("GPUFLEET_BROKER_URL", 0), ("GPUFLEET_RESULT_BACKEND", 1)):
            assert re.fullmatch(rf"redis://:\$\{{REDIS_PASSWORD(:\?[^}}]*)?\}}@redis:6379/{db}", env[key]), (name, key)


def test_models_setup_service_fills_the_volume(services: dict[str, dict[str, Any]]) -> None:
    models = services["models"]
    assert models["profiles"] == ["setup"]
    assert _command(models) == ["gpufleet", "models", "make-demo", "/models"]
    assert "models:/models" in models["volumes"]


def test_workers_wait_for_a_healthy_redis(services: dict[str, dict[str, Any]]) -> None:
    for name, service in {**_workers(services), "flower": services["flower"], "api": services["api"]}.items():
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_shared_settings_live_in_extension_fields(compose: dict[str, Any]) -> None:
    extensions = [key for key in compose if key.startswith("x-")]
    assert extensions, "shared worker settings belong in x- extension fields (YAML anchors)"
    # Written once: the broker URL appears in exactly one place in the file.
    assert COMPOSE_FILE.read_text().count("GPUFLEET_BROKER_URL:") == 1


# --- image and environment ------------------------------------------------------------------------------


def test_dockerfile_installs_the_extras_pyproject_defines() -> None:
    text = DOCKERFILE.read_text()
    match = re.search(r"pip install \"?\.\[([a-z,]+)\]", text)
    assert match, "the Dockerfile must pip install the project with its extras"
    extras = set(match.group(1).split(","))
    # api: the `api` service runs `gpufleet api` (FastAPI, uvicorn) from this image.
    assert extras == {"worker", "monitor", "demo", "api"}
    defined = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras <= set(defined)


def test_env_example_names_every_required_variable() -> None:
    required = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*):\?", COMPOSE_FILE.read_text()))
    assert required >= {"REDIS_PASSWORD", "FLOWER_USER", "FLOWER_PASSWORD", "API_TOKEN"}
    documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.MULTILINE))
    assert required <= documented, f"add to .env.example: {sorted(required - documented)}"


def test_dockerfile_base_image_is_a_build_argument_defaulting_to_the_official_image() -> None:
    text = DOCKERFILE.read_text()
    arg = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.MULTILINE)
    assert arg and arg.group(1) == "python:3.12-slim"
    (from_line,) = re.findall(r"^FROM .*$", text, re.MULTILINE)
    assert from_line == "FROM ${BASE_IMAGE}"
    assert arg.start() < text.index(from_line), "an ARG used in FROM must come before it"
    # A `# syntax=` directive makes BuildKit pull a frontend image from a registry: the build fails offline.
    assert not re.search(r"^#\s*syntax\s*=", text, re.MULTILINE | re.IGNORECASE)


def test_compose_passes_the_base_image_build_argument(compose: dict[str, Any]) -> None:
    args = compose["x-gpufleet-image"]["build"]["args"]
    assert args["BASE_IMAGE"] == "${BASE_IMAGE:-python:3.12-slim}"
    assert args["TORCH_INDEX_URL"] == "${TORCH_INDEX_URL:-}"


def test_redis_image_is_overridable_and_keeps_its_data_in_the_volume(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    assert redis["image"] == "${REDIS_IMAGE:-redis:7.4-bookworm}"
    # Explicit: a local image whose working directory is not /data must still write its AOF into the volume.
    assert _option(_command(redis), "--dir") == "/data"


def test_memlock_is_raised_for_gpu_workers_only(services: dict[str, dict[str, Any]]) -> None:
    workers = _workers(services)
    for name, service in workers.items():
        if "--gpu" in _command(service):
            assert service["ulimits"]["memlock"] == -1, name  # pinned staging buffers for host-to-device copies
        else:
            # Raising memlock fails to start a container where the runtime may not raise it; the CPU pins nothing.
            assert "ulimits" not in service, name


# --- the smoke test's override (scripts/compose_smoke.sh) ----------------------------------------------------


class _ComposeLoader(yaml.SafeLoader):
    """PyYAML with Compose's ``!reset`` tag (the value it resets to)."""


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node)
    return None


_ComposeLoader.add_constructor("!reset", _reset)

SMOKE_SERVICES = ("redis", "flower", "api", "worker-cpu", "models")


@pytest.fixture(scope="module")
def smoke() -> dict[str, dict[str, Any]]:
    data = yaml.load(SMOKE_OVERRIDE.read_text(), Loader=_ComposeLoader)  # a SafeLoader subclass
    return dict(data["services"])


def test_smoke_override_keeps_every_service_on_the_loopback(smoke: dict[str, dict[str, Any]]) -> None:
    assert set(smoke) == set(SMOKE_SERVICES)
    for name, service in smoke.items():
        assert service["network_mode"] == "host", name
        assert not service.get("ports"), f"{name}: nothing is published on the host network"
    assert _option(_command(smoke["redis"]), "--bind") == "127.0.0.1"
    assert _option(_command(smoke["flower"]), "--address") == "127.0.0.1"
    assert _option(_command(smoke["api"]), "--host") == "127.0.0.1"
    for name in ("flower", "api", "worker-cpu", "models"):
        env = smoke[name]["environment"]
        for key in ("GPUFLEET_BROKER_URL", "GPUFLEET_RESULT_BACKEND"):
            assert "@127.0.0.1:${SMOKE_REDIS_PORT:-16379}/" in env[key], (name, key)
        assert smoke[name]["build"]["network"] == "host", name


def test_smoke_override_health_checks_use_the_smoke_ports(smoke: dict[str, dict[str, Any]]) -> None:
    for name, variable in (("redis", "SMOKE_REDIS_PORT"), ("flower", "SMOKE_FLOWER_PORT"), ("api", "SMOKE_API_PORT")):
        check = " ".join(smoke[name]["healthcheck"]["test"])
        assert "127.0.0.1" in check and "${" + variable in check, name


def _compose_v2() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], check=False, capture_output=True).returncode == 0:
        return [docker, "compose"]
    pytest.skip("no `docker compose` (Compose v2) plugin: the override uses `!reset`, which Compose v1 lacks")


def test_smoke_override_renders_with_compose_v2() -> None:
    files = ["-f", str(COMPOSE_FILE), "-f", str(SMOKE_OVERRIDE)]
    result = subprocess.run(
        [*_compose_v2(), "--project-directory", str(REPO), *files, "--profile", "cpu", "--profile", "setup", "config"],
        check=False,
        capture_output=True,
        text=True,
        env=_env(**TEST_ENV, SMOKE_REDIS_PORT="16399"),
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)["services"]
    for name in SMOKE_SERVICES:
        assert rendered[name]["network_mode"] == "host", name
        assert not rendered[name].get("ports"), name
    password = TEST_ENV["REDIS_PASSWORD"]
    assert rendered["worker-cpu"]["environment"]["GPUFLEET_BROKER_URL"] == f"redis://:{password}@127.0.0.1:16399/0"
    assert "hostname" not in rendered["worker-cpu"], "a hostname conflicts with the host's network"
    assert "16399" in _command(rendered["redis"])


# --- the scripts and the README ---------------------------------------------------------------------------


@pytest.mark.parametrize("script", [SMOKE_SCRIPT, BASE_IMAGE_SCRIPT], ids=lambda path: path.name)
def test_scripts_parse(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_smoke_script_help_and_argument_errors_need_no_docker() -> None:
    helped = subprocess.run(["bash", str(SMOKE_SCRIPT), "--help"], check=False, capture_output=True, text=True)
    assert helped.returncode == 0, helped.stderr
    for flag in ("--local-base", "--base-image", "--redis-image", "--no-install", "--keep"):
        assert flag in helped.stdout, flag
    wrong = subprocess.run(["bash", str(SMOKE_SCRIPT), "--nope"], check=False, capture_output=True, text=True)
    assert wrong.returncode != 0 and "unknown argument: --nope" in wrong.stderr
    missing = subprocess.run(["bash", str(SMOKE_SCRIPT), "--base-image"], check=False, capture_output=True, text=True)
    assert missing.returncode != 0 and "--base-image needs an image" in missing.stderr


def test_smoke_script_uses_the_override_and_the_services_it_names(services: dict[str, dict[str, Any]]) -> None:
    text = SMOKE_SCRIPT.read_text()
    assert "docker/compose.smoke.yml" in text
    for name in SMOKE_SERVICES:
        assert name in services and name in text, name
    assert "down -v" in text, "the smoke test removes its volumes"


def test_readme_flower_examples_put_the_queue_at_the_top_level() -> None:
    """Flower 2.x reads ``queue`` from the top of send-task's body and ignores it inside ``options``."""
    import json

    bodies = re.findall(r"send-task/[\w.]+ .*?-d '(\{.*?\})'", README.read_text(), re.DOTALL)
    assert bodies, "the README shows a Flower send-task example"
    for raw in bodies:
        body = json.loads(raw.replace("\\\n", ""))
        assert "kwargs" in body
        assert "queue" not in body.get("options", {}), raw
