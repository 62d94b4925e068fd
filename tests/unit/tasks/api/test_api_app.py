"""The FastAPI app in-process (TestClient): endpoints, the OpenAPI contract, bearer auth, registry down -> 503,
and the app built from settings over a real redis-server."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gpufleet.tasks.api import views
from gpufleet.tasks.api.app import app_from_settings, create_app, dashboard_html
from gpufleet.tasks.errors import BrokerUnavailableError, SettingsError
from gpufleet.tasks.fleet import FleetRegistry, FleetSnapshot, HeldModel
from gpufleet.tasks.settings import load_settings
from gpufleet.workers.cli import build_parser
from gpufleet.workers.tools.local_redis import LocalRedis, free_port
from tests.unit.tasks.api.conftest import make_record

TOKEN = "t0ken-for-tests"
DATA_PATHS = ("/gpu/status", "/models/status", "/cache/status", "/workers", "/metrics")
DOWN = "could not read the fleet: the fleet registry at redis://:***@10.0.0.1:6379/0 did not answer; start Redis"


def client_for(source: Callable[[], FleetSnapshot], token: str | None = None) -> TestClient:
    return TestClient(create_app(source, registry="redis://:***@r:6379/0", token=token))


def down() -> FleetSnapshot:
    raise BrokerUnavailableError(DOWN)


def test_each_endpoint_answers_its_view(fleet: FleetSnapshot) -> None:
    client = client_for(lambda: fleet)
    assert client.get("/gpu/status").json() == views.gpu_status(fleet).model_dump(mode="json")
    assert client.get("/models/status").json() == views.models_status(fleet).model_dump(mode="json")
    assert client.get("/cache/status").json() == views.cache_status(fleet).model_dump(mode="json")
    assert client.get("/workers").json() == views.workers_list(fleet).model_dump(mode="json")
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json() | {"detail": None} == {
        "status": "ok",
        "registry": "redis://:***@r:6379/0",
        "workers": 2,
        "ready": 1,
        "detail": None,
    }


def test_metrics_are_prometheus_text(fleet: FleetSnapshot) -> None:
    answer = client_for(lambda: fleet).get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=")
    assert 'gpufleet_device_memory_used_bytes{gpu_type="h100",worker="h100-0@host-a"}' in answer.text


def test_openapi_is_the_contract(fleet: FleetSnapshot) -> None:
    spec = client_for(lambda: fleet).get("/openapi.json").json()
    assert set(DATA_PATHS) | {"/healthz"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    for model in ("GpuStatus", "ModelsStatus", "CacheStatus", "WorkersList", "WorkerView", "Health", "HeldModel"):
        assert model in schemas, model
    gpu_ref = spec["paths"]["/gpu/status"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert gpu_ref == {"$ref": "#/components/schemas/GpuStatus"}
    assert "/" not in spec["paths"]  # the page is for people, not part of the contract


def test_the_page_is_served_and_draws_from_workers(fleet: FleetSnapshot) -> None:
    answer = client_for(lambda: fleet, token=TOKEN).get("/")  # the page holds no data: no token needed
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    assert answer.text == dashboard_html()
    assert 'fetch("workers"' in answer.text


@pytest.mark.parametrize("path", DATA_PATHS)
def test_a_token_guards_every_data_endpoint(fleet: FleetSnapshot, path: str) -> None:
    client = client_for(lambda: fleet, token=TOKEN)
    missing = client.get(path)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert "GPUFLEET_API__TOKEN" in missing.json()["detail"]
    wrong = client.get(path, headers={"Authorization": "Bearer not-it"})
    assert wrong.status_code == 401
    assert "does not match" in wrong.json()["detail"]
    assert client.get(path, headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    assert client.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_healthz_stays_open_and_openapi_declares_bearer(fleet: FleetSnapshot) -> None:
    client = client_for(lambda: fleet, token=TOKEN)
    assert client.get("/healthz").status_code == 200
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "security" in spec["paths"]["/workers"]["get"]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    # The contract is public, as the README says (it said only /healthz and the page were, while both were open).
    assert client.get("/docs").status_code == 200
    readme = (Path(__file__).parents[4] / "README.md").read_text(encoding="utf-8")
    assert "`/openapi.json`, `/docs`: the contract, no fleet data) needs `Authorization: Bearer <token>`" in " ".join(
        readme.split()
    )


def test_without_a_token_nothing_asks_for_one(fleet: FleetSnapshot) -> None:
    client = client_for(lambda: fleet)
    assert all(client.get(path).status_code == 200 for path in DATA_PATHS)
    assert "securitySchemes" not in client.get("/openapi.json").json().get("components", {})


@pytest.mark.parametrize("path", DATA_PATHS)
def test_registry_down_is_a_503_with_the_registrys_message(path: str) -> None:
    answer = client_for(down, token=TOKEN).get(path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 503
    assert answer.json() == {"detail": DOWN}


def test_healthz_says_the_registry_is_down() -> None:
    answer = client_for(down).get("/healthz")
    assert answer.status_code == 503
    assert answer.json() == {
        "status": "unavailable",
        "registry": "redis://:***@r:6379/0",
        "workers": 0,
        "ready": 0,
        "detail": DOWN,
    }


def test_app_from_settings_reads_a_real_registry(redis_server: LocalRedis) -> None:
    settings = load_settings(
        broker_url=redis_server.url(40), result_backend=redis_server.url(41), fleet={"registry_cache_s": 0}
    )
    registry = FleetRegistry.from_settings(settings)
    assert registry is not None
    worker = make_record(
        "cpu-9@unit", heartbeat_at=time.time(), resident=(HeldModel(model="org/m", bytes=123),), cache_hits=5
    )
    registry.publish(worker)
    try:
        client = TestClient(app_from_settings(settings))
        listed = client.get("/workers").json()["workers"]
        held = [{"model": "org/m", "bytes": 123, "pinned": False}]
        assert [(w["name"], w["resident"]) for w in listed] == [("cpu-9@unit", held)]
        health = client.get("/healthz").json()
        assert (health["status"], health["workers"]) == ("ok", 1)
        assert redis_server.password not in health["registry"]
        registry.remove("cpu-9@unit")
        assert client.get("/workers").json()["workers"] == []
    finally:
        registry.remove("cpu-9@unit")


def test_app_from_settings_with_redis_down_answers_503() -> None:
    settings = load_settings(broker_url=f"redis://:pw@127.0.0.1:{free_port()}/0", broker={"connect_timeout_s": 0.5})
    client = TestClient(app_from_settings(settings))
    answer = client.get("/workers")
    assert answer.status_code == 503
    assert "did not answer" in answer.json()["detail"]
    assert "pw@" not in answer.json()["detail"]
    assert client.get("/healthz").json()["status"] == "unavailable"


def test_app_from_settings_without_redis_says_what_to_configure() -> None:
    settings = load_settings(broker_url="amqp://guest@rabbit//", result_backend="rpc://")
    answer = TestClient(app_from_settings(settings)).get("/gpu/status")
    assert answer.status_code == 503
    assert "redis://" in answer.json()["detail"]


def test_the_token_setting_is_secret_and_never_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUFLEET_API__TOKEN", TOKEN)
    monkeypatch.setenv("GPUFLEET_API__PORT", "9100")
    settings = load_settings()
    assert settings.api.token is not None and settings.api.token.get_secret_value() == TOKEN
    assert TOKEN not in repr(settings)
    assert (settings.api.host, settings.api.port) == ("127.0.0.1", 9100)
    monkeypatch.setenv("GPUFLEET_API__TOKEN", " ")
    with pytest.raises(SettingsError, match="GPUFLEET_API__TOKEN"):
        load_settings()


def test_the_cli_has_an_api_command() -> None:
    args = build_parser().parse_args(["api", "--host", "0.0.0.0", "--port", "9100"])
    assert (args.command, args.host, args.port) == ("api", "0.0.0.0", 9100)
    defaults = build_parser().parse_args(["api"])
    assert (defaults.host, defaults.port) == (None, None)  # GPUFLEET_API__HOST / __PORT decide


def test_metrics_follow_each_new_snapshot(fleet: FleetSnapshot) -> None:
    current = {"snapshot": fleet}
    client = client_for(lambda: current["snapshot"])
    first = client.get("/metrics").text
    assert client.get("/metrics").text == first  # the same snapshot: the same exposition
    newcomer = make_record("cpu-7@new", heartbeat_at=fleet.read_at)
    current["snapshot"] = FleetSnapshot(workers=(newcomer,), read_at=fleet.read_at)
    after = client.get("/metrics").text
    assert 'worker="cpu-7@new"' in after
    assert 'worker="h100-0@host-a"' not in after
