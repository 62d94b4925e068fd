from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest

from gpufleet.gpu.plan.selection import plan
from gpufleet.tasks.app import create_app
from gpufleet.tasks.client import FleetClient, route_of
from gpufleet.tasks.errors import ModelNotFoundError, RoutingError
from gpufleet.tasks.fleet import FleetRegistry
from gpufleet.tasks.live_routing import route_elsewhere, route_live
from gpufleet.tasks.names import gpu_type_queue
from gpufleet.tasks.planning import fleet_gpu_types, next_fallback_queue, placement_for, queue_for_model
from gpufleet.tasks.routing import REGISTRY_RETRY_S, FleetRouter, LiveRouter, app_router
from gpufleet.tasks.settings import Settings, load_settings
from gpufleet.workers.tools.local_redis import LocalRedis, free_port
from tests.support.fleet_records import NOW, GiB, fleet, held, worker

EMBED = "sentence-transformers/all-MiniLM-L6-v2"


def test_router_follows_the_app_settings_not_the_environment() -> None:
    cpu_only = load_settings(fleet={"gpu_types": ("cpu",), "live_routing": False})
    router = FleetRouter(cpu_only)
    assert router("fleet.embed", (), {"model": "sentence-transformers/all-MiniLM-L6-v2"}, {}) == {"queue": "cpu"}
    app = create_app(cpu_only)
    assert app.amqp.router.route({}, "fleet.embed", (), {"model": "org/tiny-0.5B"})["queue"].name == "cpu"


def test_explicit_queue_and_foreign_tasks_are_left_alone() -> None:
    router = FleetRouter(load_settings(fleet={"live_routing": False}))
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


# ------------------------------------------------------------------------------------------- the live fleet

SMALL = "Qwen/Qwen2.5-0.5B-Instruct"  # ~2 GiB of fp32 weights on the CPU, one T4 / L4 / H100 on a GPU
BIG = "meta-llama/Llama-3.1-70B-Instruct"  # 2 x H100


def live_settings(**fleet_options: Any) -> Settings:
    return load_settings(fleet=fleet_options)


def test_resident_beats_parked_beats_none() -> None:
    settings = live_settings()
    none, parked, resident = (
        worker("a-none"),
        worker("b-parked", parked=held(SMALL)),
        worker("c-res", resident=held(SMALL)),
    )
    decision = route_live(SMALL, fleet(none, parked, resident), settings)
    assert (decision.queue, decision.worker, decision.holding) == ("cpu.c-res", "c-res", "resident")
    decision = route_live(SMALL, fleet(none, parked), settings)
    assert (decision.queue, decision.worker, decision.holding) == ("cpu.b-parked", "b-parked", "parked")
    decision = route_live(SMALL, fleet(none, worker("d", resident=held("other/model"))), settings)
    assert (decision.queue, decision.worker, decision.holding) == ("cpu", None, None)
    assert "no ready worker holds it" in decision.reason


def test_of_two_holders_the_shorter_backlog_wins() -> None:
    busy, idle = worker("a", resident=held(SMALL), backlog=3), worker("b", resident=held(SMALL), backlog=1)
    assert route_live(SMALL, fleet(busy, idle), live_settings()).worker == "b"


def test_a_holder_over_the_backlog_bound_is_passed_over() -> None:
    settings = live_settings(max_backlog=4)
    at_bound = worker("a", resident=held(SMALL), backlog=4)
    assert route_live(SMALL, fleet(at_bound, worker("b")), settings).worker == "a"
    over = worker("a", resident=held(SMALL), backlog=5)
    decision = route_live(SMALL, fleet(over, worker("b")), settings)
    assert (decision.queue, decision.worker) == ("cpu", None)
    assert "a (resident, backlog 5)" in decision.reason
    # Parked elsewhere, within the bound: better than a load from disk.
    decision = route_live(SMALL, fleet(over, worker("b", parked=held(SMALL))), settings)
    assert (decision.worker, decision.holding) == ("b", "parked")


def test_a_multi_gpu_plan_skips_single_gpu_workers() -> None:
    settings = live_settings()
    one = worker("h100-0", "h100", memory_budget_bytes=72 * GiB)
    two = worker("h100-1+2", "h100", gpu_count=2, memory_budget_bytes=144 * GiB, backlog=2)
    decision = route_live(BIG, fleet(one, two), settings)
    # Both consume gpu.h100, so the shared queue could hand the job to the single-GPU worker: sent directly.
    assert (decision.queue, decision.worker, decision.gpu_type) == ("gpu.h100.h100-1+2", "h100-1+2", "h100")
    assert "2 x h100" in decision.reason
    # Even resident on the single-GPU worker (it cannot be, but a record may say so), the plan's count rules.
    decision = route_live(BIG, fleet(worker("h100-0", "h100", resident=held(BIG)), two), settings)
    assert decision.worker == "h100-1+2"
    with pytest.raises(RoutingError, match=r"2 x h100 \(1[0-9.]+ GiB of weights\).*h100-0 \(1 x h100"):
        route_live(BIG, fleet(one), settings)


def test_small_plans_share_the_type_queue_when_every_worker_of_it_can_hold_them() -> None:
    one = worker("h100-0", "h100", memory_budget_bytes=72 * GiB)
    two = worker("h100-1+2", "h100", gpu_count=2, memory_budget_bytes=144 * GiB)
    assert route_live(SMALL, fleet(one, two), live_settings()).queue == "gpu.h100"


def test_a_budget_too_small_is_skipped_and_pinned_models_count_against_it() -> None:
    settings = live_settings()
    tiny = worker("a-tiny", memory_budget_bytes=GiB)  # SMALL needs ~1.9 GiB of fp32 weights
    roomy = worker("b-roomy", memory_budget_bytes=8 * GiB)
    decision = route_live(SMALL, fleet(tiny, roomy), settings)
    assert (decision.queue, decision.worker) == ("cpu.b-roomy", "b-roomy"), "the shared queue would reach a-tiny"
    pinned = worker("b-roomy", memory_budget_bytes=8 * GiB, resident=held("org/pinned", 7 * GiB, pinned=True))
    with pytest.raises(RoutingError, match=r"needs cpu \(1\.[0-9] GiB of weights\).*a-tiny \(1 x cpu, budget 1\.0 GiB"):
        route_live(SMALL, fleet(tiny, pinned), settings)
    unpinned = worker("b-roomy", memory_budget_bytes=8 * GiB, resident=held("org/other", 7 * GiB))
    assert route_live(SMALL, fleet(tiny, unpinned), settings).worker == "b-roomy", "unpinned models can be evicted"


def test_workers_past_their_ttl_are_never_targeted_and_warming_ones_only_when_no_ready_one_can() -> None:
    settings = live_settings()
    warming = worker("a-warming", ready=False, resident=held(SMALL))
    dead = worker("b-dead", resident=held(SMALL), heartbeat_at=NOW - 11)
    decision = route_live(SMALL, fleet(warming, dead, worker("c")), settings)
    assert decision.worker is None and decision.queue == "cpu"
    # A restart or a deploy: only a warming worker can run it, so the job waits on its type queue for it.
    waiting = route_live(SMALL, fleet(warming, dead), settings)
    assert (waiting.queue, waiting.worker) == ("cpu", None) and "a-warming is warming up" in waiting.reason
    with pytest.raises(RoutingError, match=r"no worker is live"):
        route_live(SMALL, fleet(dead), settings)


def test_a_cpu_only_newcomer_is_routed_to_cpu_with_no_setting() -> None:
    settings = load_settings()  # no GPUFLEET_FLEET__GPU_TYPES: type routing alone would say gpu.t4
    assert queue_for_model(SMALL, settings) == "gpu.t4"
    decision = route_live(SMALL, fleet(worker("cpu-0@laptop")), settings)
    assert (decision.queue, decision.gpu_type, decision.live) == ("cpu", "cpu", True)


def test_gpu_types_setting_still_restricts_the_live_fleet() -> None:
    settings = live_settings(gpu_types=("l4",))
    with pytest.raises(RoutingError, match=r"GPUFLEET_FLEET__GPU_TYPES \(l4\) leaves out the live cpu"):
        route_live(SMALL, fleet(worker("cpu-0")), settings)


def test_the_cheapest_live_type_comes_first_and_cpu_last() -> None:
    settings = live_settings()
    cpu, h100, l4 = worker("c"), worker("h", "h100", memory_budget_bytes=72 * GiB), worker("l", "l4")
    assert route_live(SMALL, fleet(cpu, h100, l4), settings).queue == "gpu.l4"
    assert route_live(SMALL, fleet(cpu, h100), settings).queue == "gpu.h100"
    # Resident on a dearer type beats a load on the cheapest one.
    assert route_live(SMALL, fleet(l4, worker("h", "h100", resident=held(SMALL))), settings).worker == "h"


def test_a_draining_worker_is_never_targeted() -> None:
    settings = live_settings()
    stopping = worker("a-stopping", resident=held(SMALL), draining=True)
    decision = route_live(SMALL, fleet(stopping, worker("b")), settings)
    assert (decision.queue, decision.worker) == ("cpu", None), "the holder is stopping: a load elsewhere instead"
    with pytest.raises(RoutingError, match=r"a-stopping \(1 x cpu, budget 8\.0 GiB, 0 B used, draining\)"):
        route_live(SMALL, fleet(stopping), settings)
    assert fleet(stopping).ready() == () and fleet(stopping).live() == (stopping,), "still live: it beats on"


def test_a_job_given_away_after_an_oom_goes_to_a_live_worker_with_more_memory() -> None:
    settings = live_settings()
    me = worker("me", memory_budget_bytes=4 * GiB, resident=held(SMALL))
    same = worker("same", memory_budget_bytes=4 * GiB, resident=held(SMALL))
    big = worker("big", memory_budget_bytes=16 * GiB)
    decision = route_elsewhere(SMALL, fleet(me, same, big), settings, leaving="me", more_memory_than=4 * GiB)
    # The holder "same" has no more memory than "me"; "big" shares the cpu queue with both: sent to it directly.
    assert (decision.queue, decision.worker) == ("cpu.big", "big")
    assert "as me shares cpu" in decision.reason
    with pytest.raises(RoutingError, match=r"no live worker other than me with more memory than its 4\.0 GiB.*same"):
        route_elsewhere(SMALL, fleet(me, same), settings, leaving="me", more_memory_than=4 * GiB)
    with pytest.raises(RoutingError, match=r"no other worker is live"):
        route_elsewhere(SMALL, fleet(me), settings, leaving="me", more_memory_than=4 * GiB)


def test_a_job_given_away_keeps_a_shared_queue_only_when_the_leaver_does_not_consume_it() -> None:
    settings = live_settings()
    me = worker("me", "l4", memory_budget_bytes=20 * GiB)
    h100s = [worker(f"h{i}", "h100", memory_budget_bytes=72 * GiB) for i in range(2)]
    decision = route_elsewhere(SMALL, fleet(me, *h100s), settings, leaving="me", more_memory_than=20 * GiB)
    assert (decision.queue, decision.worker) == ("gpu.h100", None), "every worker on gpu.h100 is larger"
    # Its own record missing from the snapshot, the leaver still consumes its type queue: never sent back there.
    alone = worker("other-cpu")
    decision = route_elsewhere(SMALL, fleet(alone), settings, leaving="me-cpu", leaving_queue="cpu")
    assert (decision.queue, decision.worker) == ("cpu.other-cpu", "other-cpu")


def test_nothing_live_fails_fast_naming_the_need_and_the_fleet(redis_server: LocalRedis) -> None:
    registry = FleetRegistry(redis_server.url(12), cache_s=0.0)
    registry._client.flushdb()
    settings = load_settings(broker_url=redis_server.url(12), result_backend=redis_server.url(13))
    router = LiveRouter(settings)
    started = time.monotonic()
    with pytest.raises(RoutingError) as raised:
        router.decide(SMALL)
    elapsed_s = time.monotonic() - started
    message = str(raised.value)
    assert "no worker is live" in message and "it needs t4 (" in message and "gpufleet worker" in message
    assert elapsed_s < 2.0, "fails at once: nothing waits for a worker"
    registry.publish(worker("big-cpu", memory_budget_bytes=GiB, heartbeat_at=time.time()))
    with pytest.raises(RoutingError, match=r"it needs cpu \(1\.[0-9] GiB of weights\).*big-cpu \(1 x cpu, budget 1\.0"):
        LiveRouter(settings).decide(SMALL)


def test_router_client_and_celery_routes_read_the_live_registry(redis_server: LocalRedis) -> None:
    registry = FleetRegistry(redis_server.url(10))
    registry._client.flushdb()
    registry.publish(worker("a", heartbeat_at=time.time()))
    registry.publish(worker("b", heartbeat_at=time.time(), resident=held(SMALL)))
    settings = load_settings(broker_url=redis_server.url(10), result_backend=redis_server.url(11))
    app = create_app(settings)
    # Celery's own routing (what Flower's send-task and any send_task use).
    assert app.amqp.router.route({}, "fleet.embed", (), {"model": SMALL})["queue"].name == "cpu.b"
    assert app.amqp.router.route({}, "fleet.embed", (), {"model": "org/tiny-0.5B"})["queue"].name == "cpu"
    client = FleetClient(app)
    assert client.router is app_router(app), "one LiveRouter (one registry cache) per app"
    result = client.embed(SMALL, ["hello"])
    route = route_of(result)
    assert route is not None and (route.queue, route.worker) == ("cpu.b", "b")
    assert registry._client.llen("cpu.b") == 1, "the job waits on b's direct queue in the broker"
    explicit = client.embed(SMALL, ["hello"], queue="cpu.a")
    assert route_of(explicit) is not None and route_of(explicit).queue == "cpu.a"  # type: ignore[union-attr]
    assert registry._client.llen("cpu.a") == 1, "an explicit queue wins"
    assert FleetRouter(settings)("fleet.embed", (), {"model": SMALL}, {"queue": "gpu.h100"}) is None


def test_the_registry_is_read_through_its_cache(redis_server: LocalRedis) -> None:
    registry = FleetRegistry(redis_server.url(10), cache_s=60.0)
    registry._client.flushdb()
    registry.publish(worker("a", heartbeat_at=time.time()))
    router = LiveRouter(load_settings(), registry)
    assert router.decide(SMALL).queue == "cpu"
    registry.publish(worker("a", heartbeat_at=time.time(), resident=held(SMALL)))
    assert router.decide(SMALL).worker is None, "within cache_s the cached fleet answers"
    assert registry.snapshot(max_age_s=0).workers[0].holds(SMALL) == "resident"
    assert router.decide(SMALL).worker == "a"


def test_registry_down_routes_by_type_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    settings = load_settings(broker_url=url, fleet={"gpu_types": ("cpu", "l4")})
    clock = [0.0]
    router = LiveRouter(settings, clock=lambda: clock[0])
    with caplog.at_level(logging.WARNING, logger="gpufleet.tasks.routing"):
        first = router.decide(SMALL)
        second = router.decide(SMALL)
        clock[0] += REGISTRY_RETRY_S + 1  # asked again after the retry delay: still down, still one warning
        third = router.decide(SMALL)
    assert first == second == third
    assert (first.queue, first.live, first.worker) == ("gpu.l4", False, None)
    assert "did not answer" in first.reason
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "routing jobs by GPU type" in warnings[0].getMessage()


def test_live_routing_off_or_no_redis_routes_by_type() -> None:
    off = LiveRouter(load_settings(fleet={"live_routing": False}))
    assert off.registry is None and off.decide(SMALL).queue == "gpu.t4"
    assert "LIVE_ROUTING is false" in off.decide(SMALL).reason
    rabbit = LiveRouter(load_settings(broker_url="amqp://guest@127.0.0.1//", result_backend="rpc://"))
    assert (
        rabbit.registry is None and "neither the broker nor the result backend is Redis" in rabbit.decide(SMALL).reason
    )


def test_a_submit_that_times_out_names_the_queue_and_what_to_start(redis_server: LocalRedis) -> None:
    from gpufleet.tasks.errors import FleetError
    from gpufleet.workers.cli import _wait

    registry = FleetRegistry(redis_server.url(16))
    registry._client.flushdb()
    # A worker whose heartbeat says ready but which consumes nothing: the job waits on the cpu queue.
    registry.publish(worker("cpu-0@gone", heartbeat_at=time.time()))
    settings = load_settings(broker_url=redis_server.url(16), result_backend=redis_server.url(17))
    result = FleetClient(settings=settings).embed(SMALL, ["anyone?"])
    with pytest.raises(FleetError) as raised:
        _wait(result, 0.3)
    message = str(raised.value)
    assert "still waiting on queue 'cpu' (no ready worker holds it" in message
    assert "start `gpufleet worker --cpu` if none is" in message and "--queue" in message
