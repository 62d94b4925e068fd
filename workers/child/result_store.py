"""Storing the states and results of a batch's jobs in one round trip, in Celery's own format.

Celery's result backend stores one job per call, and its Redis backend reads the job's current state before each
write (two round trips per job). A batch of 32 jobs would pay 64 round trips for its results and as many again
for ``STARTED``. With a Redis result backend, :func:`store_states` writes every job's meta (encoded by the
backend itself: the same JSON a single job stores) in one round trip (a Lua script: ``SETEX`` + ``PUBLISH`` per job),
so callers waiting on ``AsyncResult.get`` are woken as usual. As Celery's own store does, a job whose stored state
is already ``SUCCESS`` is left alone: a copy of a job that ran twice (a worker that thawed after a peer took its
jobs over) never overwrites the answer the caller may already have read.

A job that is part of a group or chord, has errbacks, or runs on another result backend is stored through the
backend's own ``mark_as_done`` / ``mark_as_failure`` / ``store_result``, which handle those.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from celery import states

log = logging.getLogger(__name__)

# KEYS: result keys; ARGV: for each key its expiry in seconds (0: none) and its encoded meta. Skips a key whose
# stored meta says SUCCESS (Celery's rule), publishes what it writes. Returns how many it wrote.
_STORE_UNLESS_SUCCEEDED = """
local written = 0
for i, key in ipairs(KEYS) do
  local current = redis.call('GET', key)
  local succeeded = false
  if current then
    local ok, meta = pcall(cjson.decode, current)
    succeeded = ok and type(meta) == 'table' and meta['status'] == 'SUCCESS'
  end
  if not succeeded then
    local expires = tonumber(ARGV[2 * i - 1])
    local value = ARGV[2 * i]
    if expires > 0 then
      redis.call('SETEX', key, expires, value)
    else
      redis.call('SET', key, value)
    end
    redis.call('PUBLISH', key, value)
    written = written + 1
  end
end
return written
"""


@dataclass(frozen=True)
class StoredState:
    """One job's state to store: a result (SUCCESS), an exception (FAILURE) or a meta dict (STARTED …)."""

    job_id: str
    state: str
    value: Any
    request: Any  # celery.app.task.Context
    traceback: str | None = None


def _plain(request: Any) -> bool:
    """A job whose result needs nothing but storing (no group, chord or errbacks to drive)."""
    return not (
        getattr(request, "chord", None) or getattr(request, "group", None) or getattr(request, "errbacks", None)
    )


def _pipelinable(backend: Any) -> bool:
    return all(hasattr(backend, name) for name in ("client", "_get_result_meta", "get_key_for_task", "encode"))


def store_states(backend: Any, entries: Sequence[StoredState]) -> None:
    """Store each entry's state (see the module docstring); one round trip for the plain ones on Redis.

    Raises:
        Exception: what the backend raises for a write that failed (the job's caller would never hear back, so
            the caller of this lets it fail the batch: the pool reports it and Celery handles each job).
    """
    if not _pipelinable(backend):
        for entry in entries:
            _store_one(backend, entry)
        return
    plain: list[tuple[str, int | None, str]] = []  # (key, expires, encoded meta)
    for entry in entries:
        if getattr(entry.request, "ignore_result", False):
            continue
        if not _plain(entry.request):
            _store_one(backend, entry)
            continue
        result = backend.encode_result(entry.value, entry.state)
        meta = backend._get_result_meta(
            result=result, state=entry.state, traceback=entry.traceback, request=entry.request
        )
        meta["task_id"] = entry.job_id
        expires = backend.failure_expires if entry.state == states.FAILURE else backend.expires
        plain.append((backend.get_key_for_task(entry.job_id), expires, backend.encode(meta)))
    if not plain:
        return

    script = backend.client.register_script(_STORE_UNLESS_SUCCEEDED)
    keys = [key for key, _, _ in plain]
    argv: list[Any] = []
    for _, expires, value in plain:
        argv += [int(expires or 0), value]

    def write() -> None:
        script(keys=keys, args=argv)

    # The backend's own retry on connection errors (Redis restarting, or still loading its append-only file), as
    # its single-job store has: the writes are idempotent, so a retried pipeline stores each result once.
    ensure = getattr(backend, "ensure", None)
    if ensure is None:
        write()
    else:
        ensure(write, ())


def _store_one(backend: Any, entry: StoredState) -> None:
    if entry.state == states.SUCCESS:
        backend.mark_as_done(entry.job_id, entry.value, request=entry.request)
    elif entry.state == states.FAILURE:
        backend.mark_as_failure(entry.job_id, entry.value, traceback=entry.traceback, request=entry.request)
    else:
        backend.store_result(entry.job_id, entry.value, entry.state, request=entry.request)
