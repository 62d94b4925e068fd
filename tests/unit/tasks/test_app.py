from __future__ import annotations

import pytest

from gpufleet.tasks.app import check_json_only, create_app
from gpufleet.tasks.errors import SettingsError
from gpufleet.tasks.settings import load_settings


def test_json_only_and_gpu_serving_settings() -> None:
    app = create_app(load_settings())
    conf = app.conf
    assert conf.accept_content == ["json"]
    assert conf.result_accept_content == ["json"]
    assert conf.task_serializer == conf.result_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    # With batching on (the default) a worker reserves two batches' worth of jobs (one running, one gathering).
    assert conf.worker_prefetch_multiplier == 2 * load_settings().batching.max_batch_size
    assert create_app(load_settings(batching={"enabled": False})).conf.worker_prefetch_multiplier == 1
    assert conf.worker_cancel_long_running_tasks_on_connection_loss
    assert conf.broker_connection_retry_on_startup
    assert conf.task_soft_time_limit < conf.task_time_limit


def test_a_job_sent_without_a_queue_goes_to_the_fleet_entry_queue_never_celerys() -> None:
    app = create_app(load_settings(fleet={"live_routing": False}))
    assert app.conf.task_default_queue == "fleet"
    # A job the router leaves alone (no model) lands on the entry queue every worker consumes.
    assert app.amqp.router.route({}, "fleet.diag.sleep", (), {"seconds": 1})["queue"].name == "fleet"


def test_visibility_timeout_set_in_all_three_places() -> None:
    settings = load_settings(broker={"visibility_timeout_s": 7200})
    conf = create_app(settings).conf
    assert conf.visibility_timeout == 7200
    assert conf.broker_transport_options["visibility_timeout"] == 7200
    assert conf.result_backend_transport_options["visibility_timeout"] == 7200
    assert conf.broker_transport_options["max_retries"] == settings.broker.publish_max_retries


def test_pickle_is_refused_at_start_up() -> None:
    app = create_app(load_settings())
    app.conf.accept_content = ["json", "pickle"]
    with pytest.raises(SettingsError, match="accept_content"):
        check_json_only(app)
    app.conf.accept_content = ["json"]
    app.conf.result_serializer = "pickle"
    with pytest.raises(SettingsError, match="result_serializer"):
        check_json_only(app)
