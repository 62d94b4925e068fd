"""The generation session's channel between the worker's two processes: its address and its messages.

A generation session is one long pool job (:data:`SESSION_ENTRY`) in which the child runs a model's decode loop
while the parent keeps feeding it jobs. Besides the pool's own pipe (which carries only the session's start and
its end) the two talk over a local stream socket the parent listens on: one JSON object per line.

parent -> child:
    ``{"t": "feed", "seq": n, "jobs": [payload, ...]}``  more jobs for the loop (``seq`` counts feeds from 1);
    ``{"t": "cancel", "id": job, "reason": "revoked" | "soft-time-limit"}``;
    ``{"t": "close"}``  admit nothing more, finish what runs, end the session;
    ``{"t": "drain"}``  the worker shuts down: answer the waiting jobs "requeue", finish the running ones.

child -> parent:
    ``{"t": "hello", "token": ..., "pid": ...}``  first line: the token the session was started with;
    ``{"t": "done", ...}``  one job answered (its result already stored): see :class:`Answer`;
    ``{"t": "idle", "fed": n}``  the loop is empty after feed ``n``: the parent closes it unless it fed more since.

The token makes the socket the session's own: a connection that does not present it is dropped. Only JSON
crosses it (never pickle), so a stray local client can at worst be refused.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Literal

from gpufleet.workers.common.jobs import JobPayload

SESSION_ENTRY = "gpufleet.workers.child.session:run_session"
"""The child's entry point: ``run_session(address, token, task_name, payloads) -> list[dict]`` (every answer)."""

AnswerKind = Literal["ok", "error", "ignore", "revoked", "requeue"]


@dataclass(frozen=True)
class Answer:
    """How one job of a session ended, as the parent needs it to finish the job's Celery request.

    ``ok``: the result (its repr) is stored; ``error``: the failure is stored, ``error_type`` names the contract
    error; ``ignore``: re-sent elsewhere (nothing to store); ``revoked``: cancelled and stored as REVOKED;
    ``requeue``: never started (the worker is shutting down), to be given back to the broker.
    """

    id: str
    kind: AnswerKind
    runtime_s: float = 0.0
    result_repr: str = ""
    error_type: str = ""
    error_message: str = ""
    traceback: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"t": "done", **asdict(self)}

    @classmethod
    def from_wire(cls, message: dict[str, Any]) -> Answer:
        fields = {key: message[key] for key in cls.__dataclass_fields__ if key in message}
        return cls(**fields)


def new_address() -> str:
    """A fresh socket address: Linux's abstract namespace (no file to clean up), else a path in the temp dir."""
    name = f"gpufleet-gen-{os.getpid()}-{secrets.token_hex(6)}"
    if sys.platform.startswith("linux"):
        return "\0" + name
    return os.path.join(tempfile.gettempdir(), name + ".sock")


def new_token() -> str:
    return secrets.token_hex(16)


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), default=str).encode() + b"\n"


def payload_to_wire(payload: JobPayload) -> dict[str, Any]:
    return {"id": payload.id, "args": payload.args, "kwargs": payload.kwargs, "request_dict": payload.request_dict}


def payload_from_wire(data: dict[str, Any]) -> JobPayload:
    return JobPayload(str(data["id"]), list(data.get("args") or []), data.get("kwargs"), dict(data["request_dict"]))


class LineReader:
    """Splits a byte stream into JSON messages (a message may arrive in pieces)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        messages = []
        for line in lines:
            if line.strip():
                message = json.loads(line)
                if isinstance(message, dict):
                    messages.append(message)
        return messages
