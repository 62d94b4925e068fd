"""Merging concurrent embedding requests: alone at once when idle, merged while jobs run, each its own share."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from gpufleet.tasks.api.openai.coalescing import EmbedCoalescer
from gpufleet.tasks.api.openai.gateway import ClientGone, Disconnected, Finished
from gpufleet.tasks.errors import InferenceError
from gpufleet.tasks.names import TaskName


class HeldGateway:
    """Runs each job when the test releases it: text i's vector is "v<len(text i)>", its tokens its length + 2."""

    def __init__(self) -> None:
        self.jobs: list[list[str]] = []
        self.release = asyncio.Event()
        self.fail: Exception | None = None
        self.slots = 0

    @contextlib.contextmanager
    def slot(self, model: str) -> Iterator[None]:
        self.slots += 1
        try:
            yield
        finally:
            self.slots -= 1

    async def run(
        self, task: TaskName, body: dict[str, Any], disconnected: Disconnected, *, counted: bool = True
    ) -> Finished:
        assert task is TaskName.EMBED and not counted and body["encoding"] == "base64"
        self.jobs.append(list(body["texts"]))
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        texts = body["texts"]
        result = {"embeddings_base64": [f"v{len(t)}" for t in texts], "text_tokens": [len(t) + 2 for t in texts]}
        return Finished(f"job-{len(self.jobs)}", result, "cpu")


async def never_gone() -> bool:
    return False


def coalescer(gateway: HeldGateway) -> EmbedCoalescer:
    return EmbedCoalescer(gateway)  # type: ignore[arg-type]  # the gateway's two calls, held by the test


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_requests_merge_while_jobs_are_in_flight() -> None:
    async def main() -> None:
        gateway = HeldGateway()
        merging = coalescer(gateway)
        first = [asyncio.create_task(merging.embed("m", [f"{'x' * i}"], never_gone)) for i in (1, 2)]
        await settle()
        assert gateway.jobs == [["x"], ["xx"]]  # idle: each sent at once, alone (two jobs per holder in flight)
        later = [asyncio.create_task(merging.embed("m", ["a" * n, "b"], never_gone)) for n in (3, 4, 5)]
        await settle()
        assert len(gateway.jobs) == 2  # both places taken: the later ones wait for one to finish
        assert gateway.slots == 5  # every request counts in the model's bound, merged or not
        gateway.release.set()
        shares = await asyncio.gather(*first, *later)
        assert gateway.jobs[2] == ["aaa", "b", "aaaa", "b", "aaaaa", "b"]  # merged into one job
        assert [s.vectors for s in shares[2:]] == [["v3", "v1"], ["v4", "v1"], ["v5", "v1"]]
        assert [s.tokens for s in shares] == [3, 4, 5 + 3, 6 + 3, 7 + 3]
        assert len({s.finished.job_id for s in shares[2:]}) == 1
        assert merging.models == {} and gateway.slots == 0

    asyncio.run(main())


def test_a_job_never_carries_more_than_the_text_limit() -> None:
    async def main() -> None:
        gateway = HeldGateway()
        merging = EmbedCoalescer(gateway, max_texts=3)  # type: ignore[arg-type]
        tasks = [asyncio.create_task(merging.embed("m", ["t", "t"], never_gone)) for _ in range(5)]
        await settle()
        gateway.release.set()
        await asyncio.gather(*tasks)
        assert [len(job) for job in gateway.jobs] == [2, 2, 2, 2, 2]  # 2 + 2 would pass 3

    asyncio.run(main())


def test_the_jobs_error_reaches_each_of_its_requests() -> None:
    async def main() -> None:
        gateway = HeldGateway()
        gateway.fail = InferenceError("the forward failed")
        merging = coalescer(gateway)
        tasks = [asyncio.create_task(merging.embed("m", ["t"], never_gone)) for _ in range(4)]
        await settle()
        gateway.release.set()
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            assert isinstance(outcome, InferenceError)

    asyncio.run(main())


def test_a_request_whose_client_left_before_it_was_sent_is_never_sent() -> None:
    async def main() -> None:
        gateway = HeldGateway()
        merging = coalescer(gateway)
        busy = [asyncio.create_task(merging.embed("m", ["busy"], never_gone)) for _ in range(2)]
        await settle()
        gone = asyncio.Event()

        async def left() -> bool:
            return gone.is_set()

        leaving = asyncio.create_task(merging.embed("m", ["left"], left))
        await settle()
        gone.set()
        with pytest.raises(ClientGone):
            await leaving
        gateway.release.set()
        await asyncio.gather(*busy)
        assert ["left"] not in gateway.jobs

    asyncio.run(main())


def test_more_holders_allow_more_jobs_in_flight() -> None:
    merging = coalescer(HeldGateway())
    merging.holders["m"] = 3
    assert merging._limit("m") == 6 and merging._limit("other") == 2
