"""The producer-side router: the Celery adapter over :mod:`gpufleet.tasks.live_routing` and
:mod:`gpufleet.tasks.planning`.

Every producer path decides a job's queue the same way: the Celery router (:class:`FleetRouter`, listed in
``task_routes``, so Flower's send-task gets it too), :class:`gpufleet.tasks.client.FleetClient` and ``gpufleet plan
--live`` all go through one :class:`LiveRouter`. It routes on the live fleet
(:func:`gpufleet.tasks.live_routing.route_live`) while it can read the registry; without a Redis registry, with
``GPUFLEET_FLEET__LIVE_ROUTING=false``, or while the registry cannot be read, jobs are routed by GPU type alone
(:func:`gpufleet.tasks.live_routing.route_by_type`). An explicit ``queue=`` always wins.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from gpufleet.tasks.errors import BrokerUnavailableError
from gpufleet.tasks.fleet import FleetRegistry, FleetSnapshot
from gpufleet.tasks.live_routing import RouteDecision, route_by_type, route_live
from gpufleet.tasks.settings import Settings, redact_url

log = logging.getLogger(__name__)

REGISTRY_RETRY_S = 5.0
"""After the registry failed to answer, route by type this long before asking it again: a dead Redis host costs
the whole connect timeout per attempt, and the broker may well still be up."""


class LiveRouter:
    """One producer's routing decisions: on the live fleet while it can read the registry, else by GPU type.

    Args:
        settings: the producer's settings.
        registry: the registry to read; default the one of ``settings``, made on first use (a process that never
            routes never connects), and none when ``GPUFLEET_FLEET__LIVE_ROUTING`` is false or neither broker nor
            result backend is Redis.
        clock: monotonic seconds, for the registry's retry delay (tests pass a fake).
    """

    def __init__(
        self, settings: Settings, registry: FleetRegistry | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self._registry = registry
        self._built = registry is not None or not settings.fleet.live_routing
        self._clock = clock
        self._lock = threading.Lock()
        self._down_until = -float("inf")
        self._warned = False

    @property
    def registry(self) -> FleetRegistry | None:
        """The registry this router reads, or None when it routes by type alone."""
        if not self._built:
            with self._lock:
                if not self._built:
                    self._registry = FleetRegistry.from_settings(self.settings)
                    self._built = True
        return self._registry

    def fleet(self) -> FleetSnapshot | None:
        """The live fleet (through the registry's cache), or None when routing by type.

        A registry that does not answer is logged once per outage and not asked again for
        :data:`REGISTRY_RETRY_S`: jobs are routed by type meanwhile, since the broker may well be fine.
        """
        registry = self.registry
        now = self._clock()
        if registry is None or now < self._down_until:
            return None
        try:
            snapshot = registry.snapshot()
        except BrokerUnavailableError as exc:
            self._down_until = now + REGISTRY_RETRY_S
            if not self._warned:
                self._warned = True
                log.warning("routing jobs by GPU type until the fleet registry answers again: %s", exc)
            return None
        if self._warned:
            self._warned = False
            log.info("the fleet registry at %s answers again: routing on the live fleet", redact_url(registry.url))
        return snapshot

    def decide(self, model: str, *, queue: str | None = None) -> RouteDecision:
        """Where a job for ``model`` goes (an explicit ``queue`` always wins).

        Raises:
            RoutingError: the id is malformed, the model cannot be planned, or no live worker can run it.
            ModelNotFoundError: the producer sees the model root and the model is not installed.
        """
        if queue:
            return RouteDecision(queue=queue, worker=None, reason="explicit queue", live=False)
        fleet = self.fleet()
        if fleet is None:
            if not self.settings.fleet.live_routing:
                why = "GPUFLEET_FLEET__LIVE_ROUTING is false"
            elif self.registry is None:
                why = "no fleet registry: neither the broker nor the result backend is Redis"
            else:
                why = f"the fleet registry at {redact_url(self.registry.url)} did not answer"
            return route_by_type(model, self.settings, why)
        return route_live(model, fleet, self.settings)


class FleetRouter:
    """Celery router bound to one app's settings: ``{"queue": ...}`` for jobs that name a model.

    Jobs without a model (or with an explicit ``queue=``) are left to Celery; a worker refuses a malformed
    request with a clear error. Its :class:`LiveRouter` (``.live``) is shared with the app's
    :class:`gpufleet.tasks.client.FleetClient`, so both read one registry cache.
    """

    def __init__(self, settings: Settings, live: LiveRouter | None = None) -> None:
        self.settings = settings
        self.live = live or LiveRouter(settings)

    def __call__(
        self, name: str, args: Any, kwargs: Any, options: dict[str, Any], task: Any = None, **_: Any
    ) -> dict[str, str] | None:
        if options.get("queue") or not name.startswith("fleet."):
            return None
        model = kwargs.get("model") if isinstance(kwargs, dict) else None
        if not isinstance(model, str) or not model:
            return None
        return {"queue": self.live.decide(model).queue}


def fleet_router(app: Any) -> FleetRouter | None:
    """The :class:`FleetRouter` in a Celery app's ``task_routes``, or None when it has none."""
    routes = app.conf.task_routes or ()
    for route in routes if isinstance(routes, (list, tuple)) else (routes,):
        if isinstance(route, FleetRouter):
            return route
    return None


def app_router(app: Any) -> LiveRouter | None:
    """The :class:`LiveRouter` behind a Celery app's ``task_routes``, or None when it has no :class:`FleetRouter`."""
    router = fleet_router(app)
    return router.live if router is not None else None
