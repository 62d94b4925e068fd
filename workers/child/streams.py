"""Writing streamed jobs' token streams (the entries :mod:`gpufleet.tasks.streams` defines), one round trip a step.

The decode loop produces deltas for many sequences per step; they are buffered and written together (``XADD``
with an approximate ``MAXLEN`` and an ``EXPIRE`` per stream, in one pipeline) once the step is done. A stream
write that fails is logged and dropped: the job's result is what guarantees the answer, the stream is a view of it.
"""

from __future__ import annotations

import logging
from typing import Any

from gpufleet.tasks import streams as wire
from gpufleet.tasks.streams import stream_key
from gpufleet.workers.common.session_wire import Answer

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 86_400  # a backend without result_expires: a stream still expires


class StreamWriter:
    """Buffers stream entries and writes them in one pipeline (no-op without a Redis result backend)."""

    def __init__(self, backend: Any, *, max_entries: int) -> None:
        client = getattr(backend, "client", None)
        self._client = client if client is not None and hasattr(client, "xadd") else None
        expires: Any = getattr(backend, "expires", None)  # seconds, a timedelta, or None
        if hasattr(expires, "total_seconds"):
            expires = expires.total_seconds()
        self.ttl_s = int(expires or DEFAULT_TTL_S)
        self.max_entries = max_entries
        self._pending: list[tuple[str, dict[str, str]]] = []
        self._warned = False

    @property
    def available(self) -> bool:
        return self._client is not None

    def add(self, job_id: str, fields: dict[str, str]) -> None:
        if self._client is not None:
            self._pending.append((job_id, fields))

    def flush(self) -> None:
        if not self._pending or self._client is None:
            return
        pending, self._pending = self._pending, []
        try:
            pipe = self._client.pipeline(transaction=False)
            for job_id in dict.fromkeys(job_id for job_id, _ in pending):
                key = stream_key(job_id)
                for entry_job, fields in pending:
                    if entry_job == job_id:
                        pipe.xadd(key, fields, maxlen=self.max_entries, approximate=True)
                pipe.expire(key, self.ttl_s)
            pipe.execute()
        except Exception:  # the result still answers the job; readers time out or read the result instead
            if not self._warned:
                log.warning("could not write token streams (further failures are not logged)", exc_info=True)
                self._warned = True


def wants_stream(kwargs: Any) -> bool:
    """Whether a job's arguments ask for a token stream."""
    return isinstance(kwargs, dict) and kwargs.get("stream") is True


def stream_end(answer: Answer, result: Any, *, with_text: bool) -> list[dict[str, str]]:
    """A streamed job's last entries once it is answered: its text as one delta when nothing streamed it (the
    static path), then its result or why it has none. Nothing for a job re-sent elsewhere: its next worker
    streams it."""
    if answer.kind == "ok":
        result = result if isinstance(result, dict) else {}
        text = result.get("text")
        head = [wire.delta_fields(text, int(result.get("completion_tokens", 0)))] if with_text and text else []
        return [*head, wire.done_fields(result)]
    if answer.kind == "revoked":
        return [wire.revoked_fields(answer.error_message or "revoked")]
    if answer.kind == "error":
        return [wire.error_fields(answer.error_type or "JobError", answer.error_message)]
    return []
