"""Sending a ``/v1`` request's job through the fleet and waiting for it on the event loop.

A job is sent exactly as every producer sends one (:meth:`FleetClient.submit`: validated, routed by the live
fleet, enqueued). The send itself is a short blocking call to the broker and runs in the thread pool; waiting never
takes a thread. One pub/sub connection, read by one task, carries every result: the Celery Redis backend publishes
each state on the result's own key, so a request subscribes to its job's key *before* the job is sent (no result
can be missed), and the reader puts each state published there in the request's mailbox. Should a message still
be lost (a Redis reconnect), the request reads the key itself every few seconds. A streamed job is read from its
token stream (:mod:`gpufleet.tasks.streams`) with the asyncio Redis client.

Celery's own result consumer, which subscribes a sync connection per sent job, is switched off for the gateway's
app: this module is the only reader of its results.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import redis.asyncio as aioredis
from celery import states

from gpufleet.tasks.api.openai.errors import RATE_LIMIT, OpenAIError
from gpufleet.tasks.client import FleetClient, route_of
from gpufleet.tasks.errors import JobError
from gpufleet.tasks.names import TaskName
from gpufleet.tasks.streams import StreamDelta, parse_entry, stream_key, timed_out

log = logging.getLogger(__name__)

FALLBACK_POLL_S = 5.0  # a waiting request reads its result key itself this often, in case a message was lost
DISCONNECT_POLL_S = 0.25  # how soon a waiting request notices its client has gone
SUBSCRIBE_CONFIRM_S = 2.0
STREAM_BLOCK_MS = 1000

Disconnected = Callable[[], Awaitable[bool]]


class ClientGone(Exception):
    """The HTTP client went away before its job finished; the job was revoked."""


@dataclass(frozen=True)
class Finished:
    """A job's result and where it ran."""

    job_id: str
    result: dict[str, Any]
    queue: str | None


@dataclass
class _Mailbox:
    """The newest state published for one job: states only move forward (STARTED, then the result), so a reader
    that was slow to look only ever needs the latest, never one it missed in between."""

    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    latest: bytes | None = None


def _no_subscription(*_: Any, **__: Any) -> None:
    """Celery's per-send result subscription, switched off: the gateway subscribes itself (see the module)."""


class JobGateway:
    """Sends jobs for the ``/v1`` endpoints and awaits their results.

    Args:
        client: the producer (its app's result backend must be Redis).
        request_timeout_s: a job not finished by then is revoked and answered 504.
        max_pending_per_model: jobs of one model this gateway may have in flight; past it, 429.
    """

    def __init__(self, client: FleetClient, *, request_timeout_s: float, max_pending_per_model: int) -> None:
        backend = client.app.backend
        if not hasattr(getattr(backend, "client", None), "xread"):
            raise RuntimeError(
                f"the /v1 endpoints need a Redis result backend (results and token streams are read there); this "
                f"app's backend is {type(backend).__name__}: set GPUFLEET_RESULT_BACKEND=redis://..."
            )
        backend.on_task_call = _no_subscription
        self.client = client
        self.backend = backend
        self.request_timeout_s = request_timeout_s
        self.max_pending_per_model = max_pending_per_model
        self.pending: Counter[str] = Counter()
        self.redis: aioredis.Redis = aioredis.Redis.from_url(str(client.app.conf.result_backend))
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._mailboxes: dict[str, _Mailbox] = {}
        self._confirmations: dict[str, asyncio.Future[None]] = {}

    # ------------------------------------------------------------------------------------------------ sending

    @contextlib.contextmanager
    def slot(self, model: str) -> Iterator[None]:
        """Count one in-flight job of ``model``; 429 past the bound, so the queues cannot grow without end."""
        if self.pending[model] >= self.max_pending_per_model:
            raise OpenAIError(
                429,
                f"the fleet is overloaded: {self.pending[model]} requests for {model!r} are already waiting or "
                f"running through this API (GPUFLEET_API__MAX_PENDING_PER_MODEL={self.max_pending_per_model}); "
                "retry after a short wait, or add workers that can run it",
                type=RATE_LIMIT,
                code="fleet_overloaded",
                headers={"Retry-After": "1"},
            )
        self.pending[model] += 1
        try:
            yield
        finally:
            self.pending[model] -= 1
            if self.pending[model] <= 0:
                del self.pending[model]

    async def _send(self, task: TaskName, job_id: str, body: dict[str, Any]) -> str | None:
        """Send one job (in the thread pool: the broker call blocks); the queue it was sent to.

        Raises:
            what :meth:`FleetClient.submit` raises (nothing was sent).
        """
        sent = await anyio.to_thread.run_sync(partial(self.client.submit, task, task_id=job_id, **body))
        route = route_of(sent)
        return route.queue if route is not None else None

    async def revoke(self, job_id: str) -> None:
        """Cancel a job (queued: dropped when a worker receives it; generating: stopped within a few steps)."""
        with anyio.CancelScope(shield=True):
            try:
                await anyio.to_thread.run_sync(partial(self.client.app.control.revoke, job_id))
            except Exception as exc:
                log.warning("could not revoke job %s: %s", job_id, exc)

    # ------------------------------------------------------------------------------------------------ results

    async def run(
        self, task: TaskName, body: dict[str, Any], disconnected: Disconnected, *, counted: bool = True
    ) -> Finished:
        """Send a job and wait for its result.

        Args:
            counted: take a place in the model's bound for the job (False: the caller holds places for its
                requests, as the embedding coalescer does).

        Raises:
            OpenAIError: 429, too many jobs of the model in flight.
            FleetError: the send failed (nothing was sent), or the job failed (its contract error).
            TimeoutError: the job did not finish within the request timeout (it was revoked).
            ClientGone: the client disconnected (the job was revoked).
        """
        job_id = str(uuid.uuid4())
        raw_key = self.backend.get_key_for_task(job_id)
        key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
        with self.slot(str(body["model"])) if counted else contextlib.nullcontext():
            mailbox = await self._watch(key)
            try:
                queue = await self._send(task, job_id, body)
                meta = await self._wait(job_id, key, mailbox, disconnected)
            finally:
                await self._unwatch(key)
        return Finished(job_id, self._result(job_id, meta), queue)

    async def _wait(self, job_id: str, key: str, mailbox: _Mailbox, disconnected: Disconnected) -> dict[str, Any]:
        deadline = time.monotonic() + self.request_timeout_s
        next_poll = time.monotonic() + FALLBACK_POLL_S
        while True:
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                await self.revoke(job_id)
                raise TimeoutError(
                    f"job {job_id} did not finish within the request timeout of {self.request_timeout_s:g} s "
                    "(GPUFLEET_API__REQUEST_TIMEOUT_S); it was cancelled. Retry with a smaller max_tokens, or "
                    "when the fleet is less busy"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(mailbox.arrived.wait(), min(DISCONNECT_POLL_S, left_s))
            if mailbox.arrived.is_set():
                mailbox.arrived.clear()
                meta = self._decode(mailbox.latest) if mailbox.latest is not None else None
                if meta is not None:
                    return meta
                continue  # a state that is not ready (STARTED, REROUTED): wait for the next one
            if await disconnected():
                await self.revoke(job_id)
                raise ClientGone(job_id)
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + FALLBACK_POLL_S
                raw: Any = await self.redis.get(key)
                meta = self._decode(raw) if raw is not None else None
                if meta is not None:
                    return meta

    def _decode(self, raw: bytes) -> dict[str, Any] | None:
        """A published or stored result's meta when its state is ready, else None."""
        meta: dict[str, Any] = self.backend.decode_result(raw)
        return meta if meta.get("status") in states.READY_STATES else None

    @staticmethod
    def _result(job_id: str, meta: dict[str, Any]) -> dict[str, Any]:
        status = meta.get("status")
        result = meta.get("result")
        if status == states.SUCCESS and isinstance(result, dict):
            return result
        if isinstance(result, BaseException):
            raise result
        if status == states.REVOKED:
            raise JobError(f"job {job_id} was cancelled before it finished")
        raise JobError(f"job {job_id} ended in state {status} without a result: {result!r}")

    # --------------------------------------------------------------------------------------- the subscription

    async def _ensure_reader(self) -> None:
        if self._reader is not None and not self._reader.done():
            return
        self._pubsub = self.redis.pubsub()
        # A channel of its own keeps the connection subscribed while no request waits, so the reader never
        # reads from an unsubscribed connection.
        await self._pubsub.subscribe(f"gpufleet:api:{uuid.uuid4()}")
        self._reader = asyncio.create_task(self._read(), name="gpufleet-v1-results")

    async def _read(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except Exception as exc:  # not CancelledError (a BaseException): aclose still stops the reader
                log.warning("the result subscription failed (%s); reconnecting", exc)
                await asyncio.sleep(0.5)
                continue
            if message is None:
                continue
            channel = message["channel"]
            channel = channel.decode() if isinstance(channel, bytes) else str(channel)
            if message["type"] == "subscribe":
                confirmation = self._confirmations.pop(channel, None)
                if confirmation is not None and not confirmation.done():
                    confirmation.set_result(None)
            elif message["type"] == "message":
                mailbox = self._mailboxes.get(channel)
                if mailbox is not None:
                    mailbox.latest = message["data"]
                    mailbox.arrived.set()

    async def _watch(self, key: str) -> _Mailbox:
        """Subscribe to a result key; returns once Redis confirmed it (so the job may be sent)."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            await self._ensure_reader()
            mailbox = _Mailbox()
            confirmation: asyncio.Future[None] = loop.create_future()
            self._mailboxes[key] = mailbox
            self._confirmations[key] = confirmation
            await self._pubsub.subscribe(key)
        # Unconfirmed after this long: send anyway; the key poll finds the result all the same.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(confirmation), SUBSCRIBE_CONFIRM_S)
        return mailbox

    async def _unwatch(self, key: str) -> None:
        self._mailboxes.pop(key, None)
        self._confirmations.pop(key, None)
        with anyio.CancelScope(shield=True):
            async with self._lock:
                try:
                    await self._pubsub.unsubscribe(key)
                except Exception as exc:
                    log.debug("unsubscribe %s failed: %s", key, exc)

    # ---------------------------------------------------------------------------------------------- streaming

    async def open_stream(self, body: dict[str, Any]) -> TokenStream:
        """Send a streamed ``fleet.generate`` job; read it with :meth:`TokenStream.events`.

        Raises:
            what :meth:`run` raises before the job runs (429, a failed send).
        """
        job_id = str(uuid.uuid4())
        model = str(body["model"])
        slot = self.slot(model)
        slot.__enter__()
        try:
            queue = await self._send(TaskName.GENERATE, job_id, {**body, "stream": True})
        except BaseException:
            slot.__exit__(None, None, None)
            raise
        return TokenStream(self, job_id, queue, slot)

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
        await self.redis.aclose()


class TokenStream:
    """A sent streamed job: its deltas, then its result. Closing it early revokes the job."""

    def __init__(
        self, gateway: JobGateway, job_id: str, queue: str | None, slot: contextlib.AbstractContextManager[None]
    ) -> None:
        self.gateway = gateway
        self.job_id = job_id
        self.queue = queue
        self._slot: contextlib.AbstractContextManager[None] | None = slot

    def release(self) -> None:
        """Give back the job's place in the model's bound (once; the events' end does it too)."""
        slot, self._slot = self._slot, None
        if slot is not None:
            slot.__exit__(None, None, None)

    async def events(self) -> AsyncGenerator[StreamDelta | dict[str, Any], None]:
        """The job's deltas as they come, then its result dict.

        Raises:
            JobError: the job failed or was revoked.
            TimeoutError: the stream did not end within the request timeout (the job was revoked).
        """
        key = stream_key(self.job_id)
        timeout_s = self.gateway.request_timeout_s
        deadline = time.monotonic() + timeout_s
        last = "0"
        finished = False
        try:
            while True:
                left_ms = int((deadline - time.monotonic()) * 1000)
                if left_ms <= 0:
                    raise timed_out(self.job_id, timeout_s, last)
                reply: Any = await self.gateway.redis.xread(
                    {key: last}, count=512, block=max(1, min(STREAM_BLOCK_MS, left_ms))
                )
                for _, entries in reply or []:
                    for entry_id, raw in entries:
                        last = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                        try:
                            item = parse_entry(self.job_id, entry_id, raw)
                        except JobError:
                            finished = True
                            raise
                        if item is None:
                            continue
                        if not isinstance(item, StreamDelta):
                            finished = True
                        yield item
                        if finished:
                            return
        finally:
            self.release()
            if not finished:
                # The client left (or the stream timed out): stop the generation, free its slot in the batch.
                await self.gateway.revoke(self.job_id)
