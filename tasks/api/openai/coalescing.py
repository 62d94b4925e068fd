"""Concurrent ``/v1/embeddings`` requests for one model, merged into fewer fleet jobs.

A one-sentence embedding costs the model about a core-millisecond but a fleet job several (the message, its
delivery and acknowledgement, the result stored, published and read back: measured in the note of issue 19), so
under load the per-job cost, not the model, would bound the fleet's requests per second. The coalescer keeps a
few jobs per model in flight and, while they run, gathers the requests that arrive into the next job (up to the
contract's texts per job). An idle fleet sees no delay: a request that finds no job of its model in flight is
sent at once, alone. Each request gets back exactly its own vectors and token counts.

How many jobs per model may be in flight grows with the live workers holding the model (two each), so a model
held by many workers is spread over them by the router as before; a job is still a plain ``fleet.embed``,
planned, routed, queued and recovered like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from gpufleet.tasks.api.openai.gateway import ClientGone, Disconnected, Finished, JobGateway
from gpufleet.tasks.contracts import MAX_TEXTS
from gpufleet.tasks.fleet import FleetSnapshot
from gpufleet.tasks.names import TaskName

JOBS_PER_HOLDER = 2  # jobs in flight per worker holding the model: one running, one waiting behind it
HOLDERS_REFRESH_S = 1.0  # how often the count of workers holding a model is read again (the registry's cache)
WAIT_POLL_S = 0.25  # how soon a waiting request notices its client has gone


@dataclass(frozen=True)
class Share:
    """One request's part of a merged job: its vectors and token counts, and the job."""

    vectors: list[str]  # float32 little-endian, base64: OpenAI's encoding_format=base64 as it is
    tokens: int
    finished: Finished


@dataclass
class _Waiting:
    texts: list[str]
    future: asyncio.Future[Share]
    gone: bool = False


@dataclass
class _Model:
    waiting: list[_Waiting] = field(default_factory=list)
    in_flight: int = 0


class EmbedCoalescer:
    """Merges concurrent embedding requests per model into ``fleet.embed`` jobs.

    Args:
        gateway: sends the jobs.
        fleet: the live fleet (cached; None when unknown), for how many jobs a model may have in flight.
        max_texts: texts one job carries at most.
    """

    def __init__(
        self,
        gateway: JobGateway,
        *,
        fleet: Callable[[], FleetSnapshot | None] | None = None,
        max_texts: int = MAX_TEXTS,
    ) -> None:
        self.gateway = gateway
        self.fleet = fleet
        self.max_texts = max_texts
        self.models: dict[str, _Model] = {}
        self.holders: Counter[str] = Counter()  # live workers holding each model, as last read
        self._holders_read_at: dict[str, float] = {}
        self.jobs_sent = 0  # merged jobs sent (what a benchmark compares with the requests)

    async def embed(self, model: str, texts: list[str], disconnected: Disconnected) -> Share:
        """Embed ``texts`` (normalized) as part of a job shared with other requests for ``model``.

        Raises:
            OpenAIError: 429, the model is over the API's bound of requests in flight.
            what :meth:`JobGateway.run` raises, for the shared job.
            ClientGone: the client left (the shared job goes on for the others; alone, it is revoked).
        """
        with self.gateway.slot(model):  # the bound counts requests, merged or not
            state = self.models.setdefault(model, _Model())
            waiting = _Waiting(texts, asyncio.get_running_loop().create_future())
            state.waiting.append(waiting)
            self._dispatch(model)
            try:
                while True:
                    done, _ = await asyncio.wait({waiting.future}, timeout=WAIT_POLL_S)
                    if done:
                        return waiting.future.result()
                    if await disconnected():
                        waiting.gone = True
                        with contextlib.suppress(ValueError):
                            state.waiting.remove(waiting)  # not sent yet: it never will be
                        raise ClientGone(model)
            finally:
                if not state.waiting and not state.in_flight:
                    self.models.pop(model, None)

    def _limit(self, model: str) -> int:
        return JOBS_PER_HOLDER * max(1, self.holders[model])

    def _dispatch(self, model: str) -> None:
        """Send what waits for ``model`` while fewer jobs than its limit are in flight."""
        state = self.models.get(model)
        while state is not None and state.waiting and state.in_flight < self._limit(model):
            batch: list[_Waiting] = []
            count = 0
            while state.waiting and (not batch or count + len(state.waiting[0].texts) <= self.max_texts):
                entry = state.waiting.pop(0)
                batch.append(entry)
                count += len(entry.texts)
            state.in_flight += 1
            self.jobs_sent += 1
            asyncio.get_running_loop().create_task(self._run(model, batch), name=f"gpufleet-embed-{model}")

    async def _run(self, model: str, batch: list[_Waiting]) -> None:
        async def everyone_gone() -> bool:
            return all(entry.gone for entry in batch)

        texts = [text for entry in batch for text in entry.texts]
        try:
            finished = await self.gateway.run(
                TaskName.EMBED,
                {"model": model, "texts": texts, "normalize": True, "encoding": "base64"},
                everyone_gone,
                counted=False,
            )
            self._split(batch, finished)
        except BaseException as exc:  # every request of the job gets the job's error
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(exc if isinstance(exc, Exception) else ClientGone(model))
            if not isinstance(exc, Exception):
                raise
        finally:
            state = self.models.get(model)
            if state is not None:
                state.in_flight -= 1
            self._dispatch(model)
            if await self._refresh_holders(model):
                self._dispatch(model)  # more holders than before: more jobs may go now

    @staticmethod
    def _split(batch: list[_Waiting], finished: Finished) -> None:
        result: dict[str, Any] = finished.result
        vectors: list[str] = result["embeddings_base64"]
        tokens: list[int] = result.get("text_tokens") or []
        start = 0
        for entry in batch:
            end = start + len(entry.texts)
            counted = sum(tokens[start:end]) if len(tokens) == len(vectors) else 0
            if not entry.future.done():
                entry.future.set_result(Share(vectors[start:end], counted, finished))
            start = end

    async def _refresh_holders(self, model: str) -> bool:
        """Read again how many live workers hold ``model`` (at most once a second); whether the count grew."""
        now = time.monotonic()
        if self.fleet is None or now - self._holders_read_at.get(model, -HOLDERS_REFRESH_S) < HOLDERS_REFRESH_S:
            return False
        self._holders_read_at[model] = now
        try:
            snapshot = await anyio.to_thread.run_sync(self.fleet)
        except Exception:
            return False
        if snapshot is None:
            return False
        before = self.holders[model]
        self.holders[model] = sum(1 for worker in snapshot.routable() if worker.holds(model))
        return self.holders[model] > before
