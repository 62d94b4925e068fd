from __future__ import annotations

from pathlib import Path

import pytest

from tasks.app import create_app
from tasks.errors import RoutingError
from tasks.routing import FleetRouter, next_fallback_queue, queue_for_model
from tasks.settings import load_settings


def test_router_follows_the_app_settings_not_the_environment() -> None:
    cpu_only = load_settings(fleet={"gpu_types": ("cpu",)})
    router = FleetRouter(cpu_only)
    assert router("fleet.embed", (), {"model": "sentence-transformers/all-MiniLM-L6-v2"}, {}) == {"queue": "cpu"}
    app = create_app(cpu_only)
    assert app.amqp.router.route({}, "fleet.embed", (), {"model": "org/tiny-0.5B"})["queue"].name == "cpu"


def test_explicit_queue_and_foreign_tasks_are_left_alone() -> None:
    router = FleetRouter(load_settings())
    assert router("fleet.embed", (), {"model": "x/y-7B"}, {"queue": "gpu.h100"}) is None
    assert router("other.task", (), {"model": "x/y-7B"}, {}) is None
    assert router("fleet.diag.sleep", (), {"seconds": 1}, {}) is None


def test_plans_onto_the_cheapest_type_that_fits() -> None:
    settings = load_settings()
    assert queue_for_model("meta-llama/Llama-3.1-8B-Instruct", settings).startswith("gpu.")
    big = queue_for_model("meta-llama/Llama-3.1-70B-Instruct", settings)
    small = queue_for_model("Qwen/Qwen2.5-0.5B-Instruct", settings)
    assert big != small


def test_fleet_restriction(tmp_path: Path) -> None:
    settings = load_settings(fleet={"gpu_types": ("H100",)})
    assert queue_for_model("Qwen/Qwen2.5-0.5B-Instruct", settings) == "gpu.h100"


def test_unroutable_model_names_the_setting() -> None:
    settings = load_settings(fleet={"gpu_types": ("T4",)})
    with pytest.raises(RoutingError, match="GPUFLEET_FLEET__GPU_TYPES"):
        queue_for_model("meta-llama/Llama-3.1-405B-Instruct", settings)
    with pytest.raises(RoutingError, match="not allowed"):
        queue_for_model("../../etc", settings)


def test_fallback_queue_has_more_memory_than_the_type_that_ran_out() -> None:
    settings = load_settings(fleet={"gpu_types": ("cpu", "T4", "L4", "L40S")})
    model = "Qwen/Qwen2.5-0.5B-Instruct"
    assert next_fallback_queue(model, "cpu", settings) == "gpu.t4"
    assert next_fallback_queue(model, "t4", settings) == "gpu.l4"
    assert next_fallback_queue(model, "l4", settings) == "gpu.l40s"
    assert next_fallback_queue(model, "l40s", settings) is None
