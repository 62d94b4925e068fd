"""A streamed generate job's token stream: its entries, written by the worker, read by any producer.

A ``fleet.generate`` job sent with ``stream=True`` gets a Redis stream in the result backend's Redis
(:data:`~gpufleet.tasks.fleet.STREAM_KEY`): the worker appends one ``delta`` entry per piece of new text, in
order, and ends the stream with exactly one final entry (``done`` with the result, ``error`` or ``revoked``). The
stream's length is bounded (``GPUFLEET_GENERATION__STREAM_MAX_ENTRIES``) and it expires with the job's result, so
a reader that comes late still reads every delta from the start, and one that lost its connection resumes after
the last entry id it saw. The job's Celery result is stored as for any job: plain Celery callers see no
difference.

Entry fields (all strings, as Redis stores them)::

    type=delta   text=<new text>  tokens=<completion tokens so far>
    type=done    result=<the GenerateResult as JSON>
    type=error   error=<contract error class>  message=<what happened and what to do>
    type=revoked message=<why>

The deltas of a ``done`` stream concatenate to its result's ``text``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from gpufleet.tasks import errors
from gpufleet.tasks.fleet import STREAM_KEY

READ_BLOCK_MS = 1000  # one XREAD waits this long for new entries before the reader checks its deadline
END_TYPES = frozenset({"done", "error", "revoked"})


def stream_key(job_id: str) -> str:
    return STREAM_KEY.format(job_id=job_id)


@dataclass(frozen=True)
class StreamDelta:
    """New text of a streamed job, in order; ``entry_id`` is where a reader resumes after it."""

    text: str
    completion_tokens: int
    entry_id: str = ""
    job_id: str = ""


def delta_fields(text: str, completion_tokens: int) -> dict[str, str]:
    return {"type": "delta", "text": text, "tokens": str(completion_tokens)}


def done_fields(result: dict[str, Any]) -> dict[str, str]:
    return {"type": "done", "result": json.dumps(result)}


def error_fields(error_type: str, message: str) -> dict[str, str]:
    return {"type": "error", "error": error_type, "message": message}


def revoked_fields(reason: str) -> dict[str, str]:
    return {"type": "revoked", "message": reason}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_entry(job_id: str, entry_id: Any, raw: dict[Any, Any]) -> StreamDelta | dict[str, Any] | None:
    """One stream entry as it reads: a delta, the result (a ``done`` entry), or None for an unknown type.

    The one reading of the entry fields, for the blocking reader below and the API's asyncio one.

    Raises:
        JobError: an ``error`` entry (its contract error class, with its message) or a ``revoked`` one.
    """
    fields = {_text(k): _text(v) for k, v in raw.items()}
    kind = fields.get("type")
    if kind == "delta":
        return StreamDelta(fields.get("text", ""), int(fields.get("tokens", "0")), _text(entry_id), job_id)
    if kind == "done":
        result: dict[str, Any] = json.loads(fields["result"])
        return result
    if kind == "error":
        error_type = getattr(errors, fields.get("error", ""), None)
        if not (isinstance(error_type, type) and issubclass(error_type, errors.JobError)):
            error_type = errors.JobError
        raise error_type(fields.get("message", "the job failed"))
    if kind == "revoked":
        raise errors.JobError(f"job {job_id} was cancelled: {fields.get('message', 'revoked')}")
    return None  # a newer worker's entry type: skipped, as an older reader should


def timed_out(job_id: str, timeout_s: float, last_id: str) -> TimeoutError:
    return TimeoutError(
        f"the token stream of job {job_id} did not end within {timeout_s:g} s; read it again after id "
        f"{last_id!r} to resume, or check the job's state"
    )


def read_stream(
    client: Any, job_id: str, *, after_id: str = "0", timeout_s: float = 600.0, block_ms: int = READ_BLOCK_MS
) -> Iterator[StreamDelta | dict[str, Any]]:
    """Yield a streamed job's deltas from ``after_id`` on, then its result (a dict) once the stream ends.

    Args:
        client: a redis-py client on the result backend's Redis.
        job_id: the job's task id.
        after_id: the last entry id already read ("0": from the start).
        timeout_s: how long to wait for the stream's end in all.

    Raises:
        JobError: the job failed (the contract error's class, with its message), or was revoked
            (:class:`~gpufleet.tasks.errors.JobError` saying so).
        TimeoutError: the stream did not end within ``timeout_s`` (the job may still be queued: wait longer, or
            read it again from the last id).
    """
    import time

    key = stream_key(job_id)
    deadline = time.monotonic() + timeout_s
    last = after_id
    while True:
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            raise timed_out(job_id, timeout_s, last)
        reply = client.xread({key: last}, count=512, block=max(1, min(block_ms, left_ms)))
        for _, entries in reply or []:
            for entry_id, raw in entries:
                last = _text(entry_id)
                item = parse_entry(job_id, entry_id, raw)
                if item is None:
                    continue
                yield item
                if not isinstance(item, StreamDelta):
                    return
