"""The worker's message consumer: a message it cannot run still gets an answer the caller can read.

Celery's consumer logs and drops a task message whose body it cannot decode (pickle, broken JSON, a content type
outside ``accept_content``) or whose shape is wrong, so the caller waits until its own timeout; for an unknown task
name it stores ``NotRegistered``, a type outside the job contract. :class:`ContractConsumer` (the
``worker_consumer`` setting, set by :func:`gpufleet.workers.main.run_worker`) keeps Celery's behaviour for the message
itself (logged, then dropped: never requeued, never decoded with pickle) and, where the message's *headers* name a task
id (protocol 2 carries ``id`` and ``task`` in the headers, which decode without the body), first stores a failure
result for that id: an :class:`~gpufleet.tasks.errors.InvalidRequestError` that says what was wrong and what to send
instead.

It also checks a protocol 2 body's shape before the job is reserved (``[args, kwargs, embed]`` with a list,
a mapping and a mapping): Celery would otherwise fail inside the pool with a bare ``TypeError``, or not at all.

And it is where every fleet job turns towards the pipeline: Celery's strategies, its ETA timer and its rate-limit
buckets all hand a ready request to the consumer's ``on_task_request``; for a task of the fleet's pipeline that is
the batcher (:mod:`gpufleet.workers.parent.batching`), for anything else (the bare ``fleet.diag.noop``) the pool,
as Celery does. A job taken from the fleet's entry queue is first forwarded where the router sends it
(:mod:`gpufleet.workers.parent.entry`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any

from celery import signals
from celery.exceptions import InvalidTaskError
from celery.states import READY_STATES
from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed
from kombu.message import Message

from gpufleet.tasks.errors import InvalidRequestError
from gpufleet.tasks.settings import BatchingOptions
from gpufleet.workers.common.context import context as worker_context
from gpufleet.workers.parent.batching import Batcher, batch_size_of
from gpufleet.workers.parent.entry import EntryForwarder

log = logging.getLogger(__name__)

JSON_ONLY_HINT = "gpufleet accepts JSON only: send with serializer='json'"
# Celery's dotted path for the ``worker_consumer`` setting.
CONSUMER_PATH = "gpufleet.workers.parent.consumer:ContractConsumer"

Strategy = Callable[..., Any]


def task_identity(message: Message) -> tuple[str, str] | None:
    """The ``(task id, task name)`` a task message's headers carry, or None (control messages, protocol 1).

    Only the headers are read: they decode without the body, so this is safe on a message whose body is pickle.
    """
    headers = message.headers
    if not isinstance(headers, Mapping):
        return None
    task_id, name = headers.get("id"), headers.get("task")
    if isinstance(task_id, str) and task_id and isinstance(name, str):
        return task_id, name
    return None


def check_body_shape(payload: Any) -> None:
    """Refuse a decoded protocol 2 body that is not ``[args, kwargs, embed]``.

    A body that is a mapping with ``args`` is Celery's hybrid protocol 1 form, which Celery checks itself.

    Raises:
        InvalidTaskError: naming what is wrong (Celery's consumer routes it to ``on_invalid_task``).
    """
    if isinstance(payload, Mapping):
        if "args" in payload:
            return
        raise InvalidTaskError(f"the message body is a mapping without 'args' (keys: {sorted(map(str, payload))})")
    if not isinstance(payload, list | tuple) or len(payload) != 3:
        raise InvalidTaskError(
            f"the message body must be [args, kwargs, embed] (Celery's protocol 2); got {type(payload).__name__}"
            + (f" of length {len(payload)}" if isinstance(payload, list | tuple) else "")
        )
    args, kwargs, embed = payload
    if not isinstance(args, list | tuple):
        raise InvalidTaskError(f"the task's args must be a list; got {type(args).__name__}")
    if not isinstance(kwargs, Mapping):
        raise InvalidTaskError(f"the task's kwargs must be a mapping; got {type(kwargs).__name__}")
    if embed is not None and not isinstance(embed, Mapping):
        raise InvalidTaskError(f"the message's embed part must be a mapping; got {type(embed).__name__}")


def checked_strategy(strategy: Strategy) -> Strategy:
    """Wrap a Celery task strategy so a protocol 2 body is shape-checked before the job is reserved.

    The default strategy decodes the body anyway (``message.payload``, cached on the message), so this costs no
    second decode; a decode failure raises here exactly as it would inside the strategy.
    """

    def strategy_with_check(message: Message, body: Any, *rest: Any, **kwargs: Any) -> Any:
        if body is None:
            check_body_shape(message.payload)
        return strategy(message, body, *rest, **kwargs)

    return strategy_with_check


class ContractConsumer(Consumer):  # type: ignore[misc]  # Celery's classes are untyped
    """Celery's consumer, answering every task message it cannot run with a contract error (see module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Celery's own handler sends a request to the pool; fleet jobs go to the batcher first.
        self._to_pool: Callable[[Any], None] = getattr(self, "on_task_request")  # noqa: B009  # Celery's, untyped
        self.on_task_request = self._route_request

    def _route_request(self, request: Any) -> None:
        context = worker_context()
        settings = context.settings if context is not None else None
        if settings is not None and EntryForwarder.for_consumer(self, settings).handle(request):
            return  # taken from the entry queue: forwarded where the router sends it (or refused)
        if batch_size_of(request) is None:
            batcher: Batcher | None = getattr(self, Batcher.ATTRIBUTE, None)
            if batcher is not None:
                batcher.yield_child()  # a bare task waits behind a generation session: let it end
            self._to_pool(request)
            return
        options = settings.batching if settings is not None else BatchingOptions()
        Batcher.for_consumer(self, options).add(request)

    def update_strategies(self) -> None:
        """Build Celery's strategies, each wrapped by :func:`checked_strategy`."""
        super().update_strategies()
        self.strategies.update({name: checked_strategy(strategy) for name, strategy in self.strategies.items()})

    def on_decode_error(self, message: Message, exc: Exception) -> None:
        """A body that does not decode (broken JSON, a bad encoding): answer, then drop it (never requeue)."""
        log.error(
            "dropping a message whose body does not decode (content type %r, headers %r): %s",
            message.content_type,
            _headers_summary(message),
            exc,
        )
        self._answer(
            message,
            f"the message body could not be decoded as {_content_label(message)}: {exc}; {JSON_ONLY_HINT}",
        )
        message.ack()  # type: ignore[no-untyped-call]  # kombu is partly typed

    def on_invalid_task(self, body: Any, message: Message, exc: Exception) -> None:
        """A body of a refused content type (pickle, YAML, unknown) or of the wrong shape: answer, then drop it."""
        log.error("dropping an invalid task message (headers %r): %s", _headers_summary(message), exc)
        if isinstance(exc, ContentDisallowed):
            reason = f"the message's content type {message.content_type!r} is refused; {JSON_ONLY_HINT}"
        else:
            reason = f"the message is not a valid task message: {exc}"
        self._answer(message, reason)
        message.reject_log_error(log, self.connection_errors)  # type: ignore[no-untyped-call]
        signals.task_rejected.send(sender=self, message=message, exc=exc)

    def on_unknown_task(self, body: Any, message: Message, exc: Exception) -> None:
        """A task name no fleet task has: answer with the names this worker serves, then drop the message."""
        identity = task_identity(message)
        name = identity[1] if identity else "?"
        known = sorted(task for task in self.app.tasks if not task.startswith("celery."))
        log.error("dropping a message for the unknown task %r (headers %r)", name, _headers_summary(message))
        self._answer(message, f"unknown task {name!r}: this worker serves {', '.join(known)}; check the task name")
        message.reject_log_error(log, self.connection_errors)  # type: ignore[no-untyped-call]
        if identity:
            signals.task_unknown.send(sender=self, message=message, exc=exc, name=name, id=identity[0])

    def _answer(self, message: Message, reason: str) -> None:
        """Store ``InvalidRequestError(reason)`` as the result of the message's task id, when it has one.

        A result that is already final is left alone: a bad copy of a message must not overwrite a real answer.
        Failures to store are logged, never raised: the consumer must go on consuming.
        """
        identity = task_identity(message)
        if identity is None:
            log.warning("the dropped message carries no task id in its headers; nobody can be told (%s)", reason)
            return
        task_id, name = identity
        headers = message.headers
        request = SimpleNamespace(
            id=task_id,
            task=name,
            name=name,
            chord=None,
            group=None,
            root_id=headers.get("root_id"),
            parent_id=headers.get("parent_id"),
            correlation_id=message.properties.get("correlation_id"),
            reply_to=message.properties.get("reply_to"),
            errbacks=None,
            hostname=self.hostname,
            delivery_info=message.delivery_info,
            ignore_result=False,
        )
        backend = self.app.backend
        try:
            if backend.get_state(task_id) in READY_STATES:
                log.warning("task %s already has a final result; not overwriting it (%s)", task_id, reason)
                return
            backend.mark_as_failure(task_id, InvalidRequestError(reason), request=request, call_errbacks=False)
        except Exception:  # the result backend may be down: the consumer must keep running either way
            log.exception("could not store the failure of task %s (%s)", task_id, reason)
            return
        if self.event_dispatcher:
            self.event_dispatcher.send("task-failed", uuid=task_id, exception=f"InvalidRequestError({reason!r})")


def _content_label(message: Message) -> str:
    """What the body was sent as: JSON for JSON, else the content type (for the decode error's message)."""
    return "JSON" if message.content_type == "application/json" else repr(message.content_type)


def _headers_summary(message: Message) -> dict[str, Any]:
    """The headers worth logging (id and task), not the whole mapping (it may hold argsrepr and the like)."""
    headers = message.headers if isinstance(message.headers, Mapping) else {}
    return {key: headers.get(key) for key in ("id", "task")}
