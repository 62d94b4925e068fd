"""The Celery app and its configuration.

Every setting here has a reason tied to GPU serving, given in the comment beside it (the README sums them up).
The app is built from :class:`gpufleet.tasks.settings.Settings` so producers, workers and tests configure it one way.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from gpufleet.tasks.errors import SettingsError
from gpufleet.tasks.names import FLEET_QUEUE
from gpufleet.tasks.routing import FleetRouter
from gpufleet.tasks.settings import Settings, get_settings

log = logging.getLogger(__name__)

JSON_ONLY = ["json"]


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for ``settings`` (a plain dict, easy to inspect and test)."""
    jobs, broker = settings.jobs, settings.broker
    visibility = {"visibility_timeout": broker.visibility_timeout_s}
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        # JSON only, both ways: pickle over a broker is remote code execution.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": JSON_ONLY,
        "result_accept_content": JSON_ONLY,
        # Jobs are acknowledged after they finish; a job whose process died is requeued (and dead-lettered after
        # jobs.max_deliveries, see workers.jobs). One job reserved per process, or, with batching on, two batches'
        # worth: the batcher (workers.batching) can only gather jobs the worker has reserved, and the next batch
        # gathers while one runs (with one batch's worth, a running batch of n leaves room for only 32 - n).
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 2 * settings.batching.max_batch_size if settings.batching.enabled else 1,
        "task_soft_time_limit": jobs.soft_time_limit_s,
        "task_time_limit": jobs.time_limit_s,
        "result_expires": jobs.result_expires_s,
        "result_extended": True,
        "task_track_started": True,
        # Redis redelivers unacked jobs after visibility_timeout; Celery reads it from all three places
        # depending on the code path, and silently uses the 1 h default otherwise (celery#7651).
        "visibility_timeout": broker.visibility_timeout_s,
        "broker_transport_options": {
            **visibility,
            # Producer side: fail enqueuing after a few tries instead of hanging while the broker is down.
            "max_retries": broker.publish_max_retries,
            "interval_start": 0,
            "interval_step": broker.publish_retry_interval_s,
            "interval_max": max(broker.publish_retry_interval_s, 1.0),
            "socket_connect_timeout": broker.connect_timeout_s,
        },
        "result_backend_transport_options": {
            **visibility,
            "retry_policy": {"max_retries": broker.publish_max_retries, "timeout": broker.connect_timeout_s},
        },
        "redis_socket_connect_timeout": broker.connect_timeout_s,
        "broker_connection_timeout": broker.connect_timeout_s,
        "broker_connection_retry_on_startup": True,
        "task_publish_retry_policy": {
            "max_retries": broker.publish_max_retries,
            "interval_start": 0,
            "interval_step": broker.publish_retry_interval_s,
            "interval_max": max(broker.publish_retry_interval_s, 1.0),
        },
        # A late-ack job must not run twice after a broker blip.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # The pool child warms the GPU up before it reports alive.
        "worker_proc_alive_timeout": settings.worker.proc_alive_timeout_s,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # A job sent without a queue (and without a model the router could place) goes to the entry queue every
        # worker consumes and forwards as the router would (workers/parent/entry.py); never Celery's own "celery"
        # queue, which nobody here consumes and other applications on the same broker use.
        "task_default_queue": FLEET_QUEUE,
        "task_create_missing_queues": True,
        "task_routes": (FleetRouter(settings),),
        "worker_hijack_root_logger": False,
    }


def check_json_only(app: Celery) -> None:
    """Refuse to run with any serializer but JSON (checked at worker and producer start-up).

    Raises:
        SettingsError: naming the offending setting.
    """
    for key in ("accept_content", "result_accept_content"):
        accepted = list(app.conf.get(key) or [])
        if accepted not in (["json"], ["application/json"]):
            raise SettingsError(f"Celery setting {key} is {accepted!r}; gpufleet accepts JSON only (['json'])")
    for key in ("task_serializer", "result_serializer"):
        if app.conf.get(key) != "json":
            raise SettingsError(f"Celery setting {key} is {app.conf.get(key)!r}; gpufleet sends JSON only")


def create_app(settings: Settings | None = None, *, main: str = "gpufleet") -> Celery:
    """Build a configured Celery app (producers and workers both use this).

    Args:
        settings: explicit settings; default :func:`get_settings` (environment).
        main: the app's name.
    """
    settings = settings or get_settings()
    app = Celery(main)
    app.conf.update(celery_config(settings))
    check_json_only(app)
    return app


class RefusalsAsResults(Celery):  # type: ignore[misc]  # Celery is untyped
    """A Celery app whose ``send_task`` answers a job the fleet refuses with a stored failure instead of raising.

    This is the app the celery CLI, and so Flower, runs (``gpufleet.tasks.app:app``). Flower's send-task turns an
    exception from ``send_task`` into an HTTP 500 with an empty body (its API writes only its own HTTP errors'
    messages), so the caller never learns why. Here a refusal (no live worker can run the model, the model is not
    installed, the arguments are wrong) is stored as the FAILURE result of a fresh task id, which Flower returns:
    ``/api/task/result/<id>`` then carries the refusal's type and message. Producers use :func:`create_app`, whose
    ``send_task`` raises as Celery's does.
    """

    def send_task(self, name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        from celery.utils import uuid

        from gpufleet.tasks.errors import FleetError

        try:
            return super().send_task(name, args, kwargs, **options)
        except FleetError as exc:
            if type(exc).__name__ in _NOT_REFUSALS:
                raise  # the broker or backend is down: there is nowhere to store an answer either
            task_id = options.get("task_id") or uuid()
            log.warning("refused %s (%s): %s; stored as the failure of %s", name, type(exc).__name__, exc, task_id)
            self.backend.mark_as_failure(task_id, exc)
            return self.AsyncResult(task_id)


# Failures of the plumbing itself, raised as they are (Flower shows its own 500 / 503 for those).
_NOT_REFUSALS = frozenset({"BrokerUnavailableError", "BrokerAuthenticationError"})

app: Celery  # ``gpufleet.tasks.app:app``: declared here, built on first access by __getattr__ below


def __getattr__(name: str) -> Any:
    """``gpufleet.tasks.app:app`` for the celery CLI (Flower): built from the environment on first use, not at
    import; refusals come back as failed results (:class:`RefusalsAsResults`)."""
    if name == "app":
        global app
        settings = get_settings()
        app = RefusalsAsResults("gpufleet")
        app.conf.update(celery_config(settings))
        check_json_only(app)
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
