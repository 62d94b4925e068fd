from __future__ import annotations

from pathlib import Path

import pytest

from gpu.plan.selection import plan
from tasks.app import create_app
from tasks.client import FleetClient
from tasks.errors import ModelNotFoundError, RoutingError
from tasks.names import gpu_type_queue
from tasks.routing import FleetRouter, fleet_gpu_types, next_fallback_queue, placement_for, queue_for_model
from tasks.settings import load_settings

EMBED = "sentence-transformers/all-MiniLM-L6-v2"


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


def test_the_router_plans_onto_the_fleet_types_only() -> None:
    settings = load_settings(fleet={"gpu_types": ("h100", "l4")})
    assert fleet_gpu_types(settings) == ("h100", "l4")
    assert fleet_gpu_types(load_settings()) is None
    placement = placement_for("openai-community/gpt2", settings)
    assert placement.gpu_type == "l4"  # the catalog's cheapest fit is t4, which this fleet does not have
    assert plan("openai-community/gpt2").gpu_type == "t4"
    assert placement_for("openai-community/gpt2", settings, all_types=True).gpu_type == "t4"
    assert queue_for_model("openai-community/gpt2", settings) == gpu_type_queue("l4") == "gpu.l4"


def test_an_installed_model_is_planned_from_its_config(model_root: Path) -> None:
    settings = load_settings(model_root=model_root, fleet={"gpu_types": ("cpu",)})
    placement = placement_for(EMBED, settings)
    assert placement.params == plan(model_root / EMBED).params
    assert not any("from the name" in reason for reason in placement.reasons)


def test_a_model_missing_from_a_visible_root_is_not_found(tmp_path: Path) -> None:
    root, cache = tmp_path / "models", tmp_path / "hf"
    root.mkdir()
    settings = load_settings(model_root=root, hf_cache=cache, fleet={"gpu_types": ("cpu",)})
    with pytest.raises(ModelNotFoundError, match="not installed") as raised:
        queue_for_model("org/absent-7B", settings)
    message = str(raised.value)
    assert str(root / "org/absent-7B") in message and "gpufleet models make-demo" in message
    # Nothing was sent: the producer refuses before the broker is involved (there is none on this port).
    client = FleetClient(settings=settings.model_copy(update={"broker_url": "redis://127.0.0.1:9/0"}))
    with pytest.raises(ModelNotFoundError):
        client.embed("org/absent-7B", ["x"])
    # Without a visible root the producer cannot know, and plans from the name as before.
    assert queue_for_model("org/absent-7B", load_settings(fleet={"gpu_types": ("cpu",)})) == "cpu"


def test_a_model_in_the_hf_cache_is_found_and_planned_from_its_config(tmp_path: Path, model_root: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    snapshot = tmp_path / "hf" / ("models--" + EMBED.replace("/", "--")) / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((model_root / EMBED / "config.json").read_text())
    settings = load_settings(model_root=root, hf_cache=tmp_path / "hf", fleet={"gpu_types": ("cpu",)})
    assert placement_for(EMBED, settings).params == plan(model_root / EMBED).params
