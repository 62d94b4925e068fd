"""FleetClient against a real redis-server: a broker that is down or refuses the password fails in one clear line."""

from __future__ import annotations

import pytest

from gpufleet.tasks.client import FleetClient
from gpufleet.tasks.errors import BrokerAuthenticationError, BrokerUnavailableError
from gpufleet.tasks.settings import Settings, load_settings
from gpufleet.workers.tools.local_redis import LocalRedis, free_port


def _settings(broker_url: str, result_backend: str) -> Settings:
    return load_settings(
        broker_url=broker_url,
        result_backend=result_backend,
        # By type: these tests are about reaching the broker and backend, not about which workers are live.
        fleet={"gpu_types": ("cpu",), "live_routing": False},
        broker={"publish_max_retries": 0, "connect_timeout_s": 1.0},
    )


def _with_password(redis: LocalRedis, password: str, db: int) -> str:
    return f"redis://:{password}@127.0.0.1:{redis.port}/{db}"


def test_status_with_the_broker_down_names_the_setting() -> None:
    port = free_port()
    client = FleetClient(settings=_settings(f"redis://127.0.0.1:{port}/0", f"redis://127.0.0.1:{port}/1"))
    with pytest.raises(BrokerUnavailableError, match="GPUFLEET_BROKER_URL") as raised:
        client.status("gpu_status", timeout_s=0.2)
    assert "did not answer" in str(raised.value)
    assert not isinstance(raised.value, BrokerAuthenticationError)


@pytest.mark.parametrize(
    ("wrong", "setting"),
    [("broker", "GPUFLEET_BROKER_URL"), ("backend", "GPUFLEET_RESULT_BACKEND")],
)
def test_a_wrong_password_says_authentication_failed(redis_server: LocalRedis, wrong: str, setting: str) -> None:
    bad = "not-the-password"
    broker = _with_password(redis_server, bad, 0) if wrong == "broker" else redis_server.url(0)
    backend = _with_password(redis_server, bad, 1) if wrong == "backend" else redis_server.url(1)
    client = FleetClient(settings=_settings(broker, backend))
    with pytest.raises(BrokerAuthenticationError, match=f"authentication .* failed.*password in {setting}") as raised:
        client.embed("org/model-0.1B", ["x"])
    assert bad not in str(raised.value) and redis_server.password not in str(raised.value)
    if wrong == "broker":
        with pytest.raises(BrokerAuthenticationError, match="GPUFLEET_BROKER_URL"):
            client.status("gpu_status", timeout_s=0.2)
    else:
        assert client.status("gpu_status", timeout_s=0.2) == {}  # status uses only the broker


def test_a_missing_password_says_authentication_failed(redis_server: LocalRedis) -> None:
    no_password = f"redis://127.0.0.1:{redis_server.port}"
    client = FleetClient(settings=_settings(f"{no_password}/0", f"{no_password}/1"))
    with pytest.raises(BrokerAuthenticationError, match="check the password"):
        client.status("gpu_status", timeout_s=0.2)
