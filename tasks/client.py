"""The producer API other Python services use: validate locally, enqueue by task name, get a Celery result.

Producers never import task bodies or torch. Other languages (or a plain Celery client) send the same JSON with
``send_task("fleet.embed", kwargs={...})``; see the README.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from celery import Celery
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from pydantic import BaseModel

from gpufleet.tasks.app import create_app
from gpufleet.tasks.contracts import (
    EmbedRequest,
    GenerateRequest,
    LoadModelRequest,
    NoopRequest,
    SleepRequest,
    UnloadModelRequest,
    validate_request,
)
from gpufleet.tasks.errors import BrokerAuthenticationError, BrokerUnavailableError, JobError
from gpufleet.tasks.live_routing import RouteDecision
from gpufleet.tasks.names import ENQUEUED_AT_HEADER, TaskName
from gpufleet.tasks.routing import LiveRouter, app_router
from gpufleet.tasks.settings import Settings, get_settings, redact_url
from gpufleet.tasks.streams import StreamDelta, read_stream

ROUTE_ATTRIBUTE = "fleet_route"
# Request fields added after the first release of their task (see FleetClient.submit).
_NEWER_FIELDS: dict[TaskName, tuple[str, ...]] = {TaskName.GENERATE: ("stop", "stream"), TaskName.EMBED: ("encoding",)}


def route_of(result: Any) -> RouteDecision | None:
    """Where :meth:`FleetClient.submit` sent a job and why; None for a job sent without a model (or elsewhere)."""
    route = getattr(result, ROUTE_ATTRIBUTE, None)
    return route if isinstance(route, RouteDecision) else None


_REQUESTS: dict[TaskName, type[BaseModel]] = {
    TaskName.EMBED: EmbedRequest,
    TaskName.GENERATE: GenerateRequest,
    TaskName.LOAD_MODEL: LoadModelRequest,
    TaskName.UNLOAD_MODEL: UnloadModelRequest,
    TaskName.SLEEP: SleepRequest,
    TaskName.NOOP: NoopRequest,
}


class FleetClient:
    """Enqueue fleet jobs.

    Args:
        app: a configured Celery app; default one built from ``settings`` (or the environment).
        settings: settings to build the app from.
    """

    def __init__(self, app: Celery | None = None, settings: Settings | None = None) -> None:
        self.app = app or create_app(settings)
        # The app's own router when it has one (one registry cache for both), else one for these settings.
        self.router = app_router(self.app) or LiveRouter(settings or get_settings())

    def submit(
        self, task: TaskName | str, queue: str | None = None, *, task_id: str | None = None, **kwargs: Any
    ) -> AsyncResult:
        """Validate ``kwargs`` against the task's contract and enqueue it.

        Args:
            task: a :class:`TaskName` or its string.
            queue: send to this queue instead of the routed one (e.g. a worker's direct queue).
            task_id: the job's id; default a new UUID (a caller that watches the result before sending names it).
            **kwargs: the request fields.

        Returns:
            The Celery result; ``.get(timeout=...)`` returns the documented JSON dict, and :func:`route_of` says
            where it was sent and why.

        Raises:
            InvalidRequestError: the arguments do not match the contract (nothing was sent).
            RoutingError: no queue can take the model (nothing was sent).
            BrokerUnavailableError: the broker or result backend did not answer after the configured retries
                (nothing was sent).
            BrokerAuthenticationError: the broker or result backend refused the password in its URL.
            ModelNotFoundError: the producer sees the model root and the model is not installed there.
        """
        name = TaskName(task)
        request = validate_request(_REQUESTS[name], kwargs)
        options: dict[str, Any] = {"headers": {ENQUEUED_AT_HEADER: time.time()}}
        model = getattr(request, "model", None)
        # Routed here rather than by the app's router, so the caller learns where the job waits (route_of).
        route = self.router.decide(model, queue=queue) if isinstance(model, str) and model else None
        if route is not None or queue:
            options["queue"] = route.queue if route is not None else queue
        if task_id is not None:
            options["task_id"] = task_id
        action = f"could not enqueue {name.value} (nothing was sent)"
        try:
            body = request.model_dump(mode="json")
            # Fields a job leaves at their defaults stay out of the message, so workers of the release before
            # them (their contract forbids unknown fields) still serve it during a rolling upgrade.
            for field in _NEWER_FIELDS.get(name, ()):
                if body.get(field) == type(request).model_fields[field].get_default(call_default_factory=True):
                    body.pop(field, None)
            result = self.app.send_task(name.value, kwargs=body, **options)
            setattr(result, ROUTE_ATTRIBUTE, route)
            return result
        except OperationalError as exc:
            raise self._unreachable(action, exc, backend=False) from exc
        except RuntimeError as exc:
            # The Redis result backend subscribes for the result while sending and, when it cannot connect,
            # raises a bare RuntimeError ("Retry limit exceeded ... result store") from the connection error.
            if connection_failure(exc) is None:
                raise
            raise self._unreachable(action, exc, backend=True) from exc

    def embed(
        self,
        model: str,
        texts: list[str],
        *,
        normalize: bool = True,
        encoding: str = "float",
        queue: str | None = None,
    ) -> AsyncResult:
        """Enqueue ``fleet.embed`` (``encoding="base64"``: vectors as float32 little-endian, base64)."""
        return self.submit(
            TaskName.EMBED, queue=queue, model=model, texts=texts, normalize=normalize, encoding=encoding
        )

    def generate(self, model: str, *, queue: str | None = None, **kwargs: Any) -> AsyncResult:
        """Enqueue ``fleet.generate`` (``prompt=`` or ``messages=``, plus ``max_new_tokens`` etc.)."""
        return self.submit(TaskName.GENERATE, queue=queue, model=model, **kwargs)

    def generate_stream(
        self,
        model: str,
        *,
        queue: str | None = None,
        timeout_s: float = 600.0,
        cancel_on_close: bool = True,
        **kwargs: Any,
    ) -> Iterator[StreamDelta | dict[str, Any]]:
        """Enqueue ``fleet.generate`` with ``stream=True``; yield its text deltas as they come, then its result.

        The deltas (:class:`~gpufleet.tasks.streams.StreamDelta`) concatenate to the result's ``text``. Closing
        the iterator before the end (``break``, an exception, garbage collection) revokes the job when
        ``cancel_on_close`` is set, so its generation stops within a few decode steps.

        Raises:
            what :meth:`submit` raises; the job's contract error if it fails; TimeoutError after ``timeout_s``.
            ConfigError-like RuntimeError: the result backend is not Redis (the stream lives there).
        """
        client = getattr(self.app.backend, "client", None)
        if client is None or not hasattr(client, "xread"):
            raise RuntimeError(
                f"streaming needs a Redis result backend (the token stream lives there); this app's backend is "
                f"{type(self.app.backend).__name__}: set GPUFLEET_RESULT_BACKEND=redis://..."
            )
        result = self.submit(TaskName.GENERATE, queue=queue, model=model, stream=True, **kwargs)
        finished = False
        try:
            for item in read_stream(client, result.id, timeout_s=timeout_s):
                if not isinstance(item, StreamDelta):
                    finished = True
                yield item
            finished = True
        except JobError:
            finished = True
            raise
        finally:
            if not finished and cancel_on_close:
                result.revoke()

    def load_model(self, model: str, *, priority: bool = False, queue: str | None = None) -> AsyncResult:
        """Enqueue ``fleet.load_model``."""
        return self.submit(TaskName.LOAD_MODEL, queue=queue, model=model, priority=priority)

    def unload_model(self, model: str, *, queue: str | None = None) -> AsyncResult:
        """Enqueue ``fleet.unload_model``."""
        return self.submit(TaskName.UNLOAD_MODEL, queue=queue, model=model)

    def status(self, command: str, *, timeout_s: float = 2.0, limit: int | None = None) -> dict[str, Any]:
        """Broadcast a status command (``worker_status``: the next three at once; ``gpu_status``, ``models_status``,
        ``cache_status``) to every worker.

        Args:
            command: the control command's name.
            timeout_s: how long to collect replies.
            limit: stop collecting after this many replies (the live workers' count): no wait for the timeout.

        Returns:
            The replies merged: worker name -> that worker's answer (empty when no worker answered).

        Raises:
            BrokerUnavailableError: the broker did not answer.
            BrokerAuthenticationError: the broker refused the password in its URL.
        """
        try:
            replies = self.app.control.broadcast(command, reply=True, timeout=timeout_s, limit=limit)
        except OperationalError as exc:
            raise self._unreachable(f"could not ask the workers for {command}", exc, backend=False) from exc
        merged: dict[str, Any] = {}
        for reply in replies or []:
            merged.update(reply)
        return merged

    def _unreachable(self, action: str, exc: BaseException, *, backend: bool) -> BrokerUnavailableError:
        """The error for a broker (or result backend) that failed ``action``: refused the password, or is down."""
        what, setting = ("result backend", "GPUFLEET_RESULT_BACKEND") if backend else ("broker", "GPUFLEET_BROKER_URL")
        url = redact_url(str(self.app.conf.result_backend if backend else self.app.conf.broker_url))
        failure = connection_failure(exc)
        if failure is not None and _is_authentication_error(failure):
            return BrokerAuthenticationError(
                f"{action}: authentication to the {what} at {url} failed ({str(failure).strip()}); check the "
                f"password in {setting} (redis://:PASSWORD@host:port/db): it must match the server's requirepass"
            )
        detail = f" ({failure})" if failure is not None else ""
        # Broker and results usually share one Redis; when the backend is down the broker is likely down too.
        also = " (and GPUFLEET_BROKER_URL, usually the same Redis)" if backend else ""
        return BrokerUnavailableError(
            f"{action}: the {what} at {url} did not answer{detail}; start it or point {setting}{also} at a running one"
        )


def _is_authentication_error(exc: BaseException) -> bool:
    # By name: redis-py's AuthenticationError, without importing redis into every producer.
    return any(cls.__name__ == "AuthenticationError" for cls in type(exc).__mro__)


def connection_failure(exc: BaseException) -> BaseException | None:
    """The broker connection problem in ``exc`` or its cause chain, or ``None`` when there is none.

    A refused login is returned first (redis-py raises it beneath a kombu ``OperationalError``, which alone would
    read as "did not answer"); otherwise the first socket, redis or kombu connection error.
    """
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for link in chain:
        if _is_authentication_error(link):
            return link
    for link in chain:
        if isinstance(link, (OSError, OperationalError)) or any(
            cls.__name__ in ("ConnectionError", "TimeoutError") for cls in type(link).__mro__
        ):
            return link
    return None
