"""Shared fixtures: a real redis-server per session, the demo model root, settings isolation."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet.tasks.settings import get_settings
from gpufleet.workers.tools.local_redis import LocalRedis

# No hub at run time: anything that tries the network fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


TESTS = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with what it needs, from where it lives and what it uses, so ``-m`` selects for real.

    ``integration``: under tests/integration (real worker processes); ``gpu``: under tests/gpu; ``redis``: uses
    the ``redis_server`` fixture (a redis-server binary on this machine), directly or through another fixture.
    """
    for item in items:
        parts = Path(str(item.path)).relative_to(TESTS).parts
        if parts[0] == "integration":
            item.add_marker(pytest.mark.integration)
        if parts[0] == "gpu":
            item.add_marker(pytest.mark.gpu)
        if "redis_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.redis)


@pytest.fixture(autouse=True)
def _fresh_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests see only the GPUFLEET_* variables they set."""
    for key in list(os.environ):
        if key.startswith("GPUFLEET_"):
            monkeypatch.delenv(key)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    """A private redis-server (AOF on, password) on a free port, for the whole session."""
    with LocalRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model root holding the demo models (real MiniLM, generated tiny-chat)."""
    from gpufleet.workers.tools.demo_models import make_demo_models

    root = tmp_path_factory.mktemp("models")
    make_demo_models(root)
    return root


@pytest.fixture(scope="session")
def tiny_model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three tiny causal LMs of different architectures (org/a llama, org/b qwen2, org/c mistral)."""
    from gpufleet.workers.tools.checkpoints import make_checkpoint

    root = tmp_path_factory.mktemp("tiny-models")
    for name, arch in (("a", "llama"), ("b", "qwen2"), ("c", "mistral")):
        make_checkpoint(root / "org" / name, arch)
    return root
