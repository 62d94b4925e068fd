"""The fleet's entry queue (``fleet``): every worker consumes it, and its parent forwards each job exactly as the
producers' router would have sent it.

A producer going through gpufleet's app routes each job itself (:class:`gpufleet.tasks.routing.FleetRouter`); a
plain Celery client cannot. It sends to ``fleet`` instead (its ``queue=``, or ``task_default_queue="fleet"``; jobs
sent without a queue through gpufleet's own app land there too). Whichever worker takes such a job asks the same
router (this worker's app's, with its registry cache) where it goes and re-publishes the message, unchanged, to that
queue, then acknowledges it: the job runs where it would have had the producer routed it. Jobs the router leaves
alone (no model: diagnostics, Celery's own tasks) run on the worker that took them. A job the router refuses (no
live worker can run the model, a model not installed) fails at once with the router's reason.

This happens in the parent, before the batcher: forwarding never occupies the pool child. Celery's own ``celery``
queue is never consumed: other applications on the same broker use it.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker import state as worker_state

from gpufleet.gpu.plan.meta_count import without_meta_count
from gpufleet.tasks.errors import FleetError, JobError
from gpufleet.tasks.names import FLEET_QUEUE
from gpufleet.tasks.routing import FleetRouter, fleet_router
from gpufleet.tasks.settings import Settings

log = logging.getLogger(__name__)


def came_from_entry(request: Any) -> bool:
    """Whether a Celery request was taken from the entry queue (its delivery's routing key)."""
    info = getattr(request, "delivery_info", None) or {}
    return isinstance(info, dict) and info.get("routing_key") == FLEET_QUEUE


class EntryForwarder:
    """Forwards the jobs a worker takes from the entry queue (see the module docstring).

    Args:
        app: the worker's Celery app: its router (and registry cache) decides, its producer pool re-publishes.
        settings: for a router of its own when the app has none.
    """

    ATTRIBUTE = "_gpufleet_entry"

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.router = fleet_router(app) or FleetRouter(settings)
        self.forwarded = 0

    @classmethod
    def for_consumer(cls, consumer: Any, settings: Settings) -> EntryForwarder:
        """The consumer's forwarder (one per consumer, so its router's registry cache is kept)."""
        forwarder: EntryForwarder | None = getattr(consumer, cls.ATTRIBUTE, None)
        if forwarder is None:
            forwarder = cls(consumer.app, settings)
            setattr(consumer, cls.ATTRIBUTE, forwarder)
        return forwarder

    def handle(self, request: Any) -> bool:
        """Forward ``request`` if it came from the entry queue and the router has a queue for it.

        Returns:
            True when the request was dealt with here (forwarded, or refused with a stored failure); False when
            it is this worker's to run (not from the entry queue, or a job the router leaves alone).
        """
        if not came_from_entry(request):
            return False
        try:
            with without_meta_count():  # the parent never imports torch, even to count an unusual model
                route = self.router(request.name, request.args, request.kwargs, {})
        except Exception as exc:  # the router's refusal: the producer would have been told at once
            self._refuse(request, exc)
            return True
        if route is None:
            return False  # no model to route by: whoever takes it runs it, as Celery's default queue would
        queue = route["queue"]
        try:
            self._republish(request.message, queue)
        except Exception:  # the broker went away: the job stays on the entry queue for whoever takes it next
            log.warning("could not forward job %s from %s to %s; giving it back", request.id, FLEET_QUEUE, queue)
            worker_state.task_ready(request)
            request.reject(requeue=True)
            return True
        worker_state.task_ready(request)
        request.acknowledge()
        self.forwarded += 1
        log.info("forwarded %s %s from the %s queue to %s", request.name, request.id, FLEET_QUEUE, queue)
        return True

    def _republish(self, message: Any, queue_name: str) -> None:
        """The message as it came (body, headers, properties) on ``queue_name``, as Celery's producer sends it."""
        queue = self.app.amqp.queues[queue_name]  # declared on the fly (task_create_missing_queues)
        properties = message.properties
        with self.app.producer_or_acquire() as producer:
            producer.publish(
                message.body,
                exchange=queue.exchange,
                routing_key=queue.routing_key,
                declare=[queue],
                headers=message.headers,
                content_type=message.content_type,
                content_encoding=message.content_encoding,
                correlation_id=properties.get("correlation_id"),
                reply_to=properties.get("reply_to"),
                priority=properties.get("priority"),
                retry=True,
                retry_policy=self.app.conf.task_publish_retry_policy,
            )

    def _refuse(self, request: Any, exc: Exception) -> None:
        """Store the router's refusal as the job's failure, then drop the message (sending it again fails alike)."""
        if not isinstance(exc, FleetError):
            log.exception("routing job %s from the %s queue failed", request.id, FLEET_QUEUE)
            exc = JobError(f"could not route {request.name} {request.id}: {type(exc).__name__}: {exc}")
        log.warning("refused %s %s from the %s queue: %s", request.name, request.id, FLEET_QUEUE, exc)
        try:
            request.task.backend.mark_as_failure(request.id, exc, request=request._context, call_errbacks=False)
        except Exception:  # the result backend may be down: the consumer must keep running either way
            log.exception("could not store the refusal of job %s", request.id)
        request.send_event("task-failed", exception=f"{type(exc).__name__}({str(exc)!r})")
        worker_state.task_ready(request)
        request.acknowledge()
