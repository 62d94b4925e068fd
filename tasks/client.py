"""The producer API other Python services use: validate locally, enqueue by task name, get a Celery result.

Producers never import task bodies or torch. Other languages (or a plain Celery client) send the same JSON with
``send_task("fleet.embed", kwargs={...})``; see the README.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from pydantic import BaseModel

from tasks.app import create_app
from tasks.contracts import (
    EmbedRequest,
    GenerateRequest,
    LoadModelRequest,
    SleepRequest,
    UnloadModelRequest,
    validate_request,
)
from tasks.errors import BrokerUnavailableError
from tasks.names import TaskName
from tasks.settings import Settings

ENQUEUED_AT_HEADER = "fleet_enqueued_at"

_REQUESTS: dict[TaskName, type[BaseModel]] = {
    TaskName.EMBED: EmbedRequest,
    TaskName.GENERATE: GenerateRequest,
    TaskName.LOAD_MODEL: LoadModelRequest,
    TaskName.UNLOAD_MODEL: UnloadModelRequest,
    TaskName.SLEEP: SleepRequest,
}


class FleetClient:
    """Enqueue fleet jobs.

    Args:
        app: a configured Celery app; default one built from ``settings`` (or the environment).
        settings: settings to build the app from.
    """

    def __init__(self, app: Celery | None = None, settings: Settings | None = None) -> None:
        self.app = app or create_app(settings)

    def submit(self, task: TaskName | str, queue: str | None = None, **kwargs: Any) -> AsyncResult:
        """Validate ``kwargs`` against the task's contract and enqueue it.

        Args:
            task: a :class:`TaskName` or its string.
            queue: send to this queue instead of the routed one (e.g. a worker's direct queue).
            **kwargs: the request fields.

        Returns:
            The Celery result; ``.get(timeout=...)`` returns the documented JSON dict.

        Raises:
            InvalidRequestError: the arguments do not match the contract (nothing was sent).
            RoutingError: no queue can take the model (nothing was sent).
            BrokerUnavailableError: the broker did not answer after the configured retries.
        """
        name = TaskName(task)
        request = validate_request(_REQUESTS[name], kwargs)
        options: dict[str, Any] = {"headers": {ENQUEUED_AT_HEADER: time.time()}}
        if queue:
            options["queue"] = queue
        try:
            return self.app.send_task(name.value, kwargs=request.model_dump(mode="json"), **options)
        except OperationalError as exc:
            raise BrokerUnavailableError(
                f"could not enqueue {name.value}: the broker at {_redact(self.app.conf.broker_url)} did not "
                f"answer ({exc}); start it or point GPUFLEET_BROKER_URL at a running one"
            ) from exc
        except RuntimeError as exc:
            # The Redis result backend subscribes for the result while sending and, when it cannot connect,
            # raises a bare RuntimeError ("Retry limit exceeded ... result store") from the connection error.
            if not _caused_by_connection_failure(exc):
                raise
            raise BrokerUnavailableError(
                f"could not enqueue {name.value} (nothing was sent): the result backend at "
                f"{_redact(str(self.app.conf.result_backend))} did not answer; start it or point "
                "GPUFLEET_RESULT_BACKEND (and GPUFLEET_BROKER_URL, usually the same Redis) at a running one"
            ) from exc

    def embed(self, model: str, texts: list[str], *, normalize: bool = True, queue: str | None = None) -> AsyncResult:
        """Enqueue ``fleet.embed``."""
        return self.submit(TaskName.EMBED, queue=queue, model=model, texts=texts, normalize=normalize)

    def generate(self, model: str, *, queue: str | None = None, **kwargs: Any) -> AsyncResult:
        """Enqueue ``fleet.generate`` (``prompt=`` or ``messages=``, plus ``max_new_tokens`` etc.)."""
        return self.submit(TaskName.GENERATE, queue=queue, model=model, **kwargs)

    def load_model(self, model: str, *, priority: bool = False, queue: str | None = None) -> AsyncResult:
        """Enqueue ``fleet.load_model``."""
        return self.submit(TaskName.LOAD_MODEL, queue=queue, model=model, priority=priority)

    def unload_model(self, model: str, *, queue: str | None = None) -> AsyncResult:
        """Enqueue ``fleet.unload_model``."""
        return self.submit(TaskName.UNLOAD_MODEL, queue=queue, model=model)

    def status(self, command: str, *, timeout_s: float = 2.0) -> dict[str, Any]:
        """Broadcast a status command (``gpu_status``, ``models_status``, ``cache_status``) to every worker."""
        replies = self.app.control.broadcast(command, reply=True, timeout=timeout_s)
        merged: dict[str, Any] = {}
        for reply in replies or []:
            merged.update(reply)
        return merged


def _caused_by_connection_failure(exc: BaseException) -> bool:
    """Whether a connection error (socket, redis or kombu) is somewhere in ``exc``'s cause chain."""
    seen: BaseException | None = exc.__cause__ or exc.__context__
    while seen is not None:
        if isinstance(seen, (OSError, OperationalError)) or any(
            cls.__name__ in ("ConnectionError", "TimeoutError") for cls in type(seen).__mro__
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _redact(url: str) -> str:
    """A broker URL without its password."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user + ':***' if ':' in credentials else user}@{host}"
