"""The markers that say what a test needs are applied from what it uses (tests/conftest.py), so ``-m`` selects."""

from __future__ import annotations

import pytest

from gpufleet.workers.tools.local_redis import LocalRedis


def test_a_test_using_redis_is_marked_redis(request: pytest.FixtureRequest, redis_server: LocalRedis) -> None:
    assert request.node.get_closest_marker("redis") is not None
    assert request.node.get_closest_marker("integration") is None


def test_a_test_without_it_is_not(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("redis") is None
