"""API keys of the ``/v1`` endpoints: who is calling, which models it may use, and how fast.

Keys are held as SHA-256 digests only; a request's key is hashed and compared with every key's digest in constant
time (no early exit), so neither response times nor a memory dump give a key away. A key's limits are this API
process's: with several API replicas, each enforces them on its own share of the traffic.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from gpufleet.tasks.api.openai.errors import AUTHENTICATION, PERMISSION, RATE_LIMIT, OpenAIError
from gpufleet.tasks.errors import SettingsError
from gpufleet.tasks.settings import ApiKey, Settings

WINDOW_S = 60.0
TOKEN_KEY_NAME = "token"  # the name GPUFLEET_API__TOKEN goes by in usage metrics


@dataclass
class Caller:
    """One key and its live counts."""

    name: str
    digest: bytes
    models: frozenset[str] = frozenset()
    requests_per_minute: int | None = None
    max_concurrent: int | None = None
    recent: deque[float] = field(default_factory=deque)  # start times within the last minute
    in_flight: int = 0

    def may_use(self, model: str) -> bool:
        return not self.models or model in self.models


ANONYMOUS = Caller("anonymous", b"")


class KeyRing:
    """The keys of the ``/v1`` endpoints; with none, the endpoints are open (every caller is ``anonymous``).

    Args:
        keys: the callers.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, keys: list[Caller], *, clock: Callable[[], float] = time.monotonic) -> None:
        names = [key.name for key in keys]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise SettingsError(f"API key names must be unique; {duplicates} appear more than once: rename them")
        self.callers = keys
        self.clock = clock

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        """The keys of ``GPUFLEET_API__KEYS``, ``GPUFLEET_API__KEYS_FILE`` and ``GPUFLEET_API__TOKEN`` (no limits).

        Raises:
            SettingsError: the keys file cannot be read or holds an invalid key; two keys share a name.
        """
        keys = list(settings.api.keys)
        if settings.api.keys_file is not None:
            keys += read_keys_file(settings.api.keys_file)
        callers = [
            Caller(
                key.name,
                key.digest(),
                frozenset(key.models),
                key.requests_per_minute,
                key.max_concurrent,
            )
            for key in keys
        ]
        if settings.api.token is not None:
            token = settings.api.token.get_secret_value().encode()
            callers.append(Caller(TOKEN_KEY_NAME, hashlib.sha256(token).digest()))
        return cls(callers)

    @property
    def open(self) -> bool:
        return not self.callers

    def authenticate(self, authorization: str | None) -> Caller:
        """The caller behind an ``Authorization`` header.

        Raises:
            OpenAIError: 401, the header is missing or its key matches none.
        """
        if self.open:
            return ANONYMOUS
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise OpenAIError(
                401,
                "this endpoint needs an API key: send `Authorization: Bearer <key>` (the openai client's api_key) "
                "with a key from GPUFLEET_API__KEYS, or the API's GPUFLEET_API__TOKEN",
                type=AUTHENTICATION,
                code="missing_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        digest = hashlib.sha256(presented.strip().encode()).digest()
        found: Caller | None = None
        for caller in self.callers:  # every key, always: the time taken does not depend on which one matched
            if hmac.compare_digest(digest, caller.digest):
                found = caller
        if found is None:
            raise OpenAIError(
                401,
                "the API key matches none of this API's keys; check the key you were given (its SHA-256 digest "
                "must be one of GPUFLEET_API__KEYS' key_sha256)",
                type=AUTHENTICATION,
                code="invalid_api_key",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return found

    def authorize(self, caller: Caller, model: str) -> None:
        """Raises: OpenAIError: 403, the key may not use ``model``."""
        if not caller.may_use(model):
            allowed = ", ".join(sorted(caller.models))
            raise OpenAIError(
                403,
                f"key {caller.name!r} may not use model {model!r}; it may use: {allowed}. Ask for a key that "
                "allows it, or pick one of those",
                type=PERMISSION,
                param="model",
                code="model_not_allowed",
            )

    @contextmanager
    def admit(self, caller: Caller) -> Iterator[None]:
        """Count one request of ``caller`` for as long as it runs.

        Raises:
            OpenAIError: 429 with ``Retry-After``: the key is over its requests per minute or its concurrent jobs.
        """
        now = self.clock()
        while caller.recent and caller.recent[0] <= now - WINDOW_S:
            caller.recent.popleft()
        if caller.requests_per_minute is not None and len(caller.recent) >= caller.requests_per_minute:
            wait_s = max(1, math.ceil(caller.recent[0] + WINDOW_S - now))
            raise OpenAIError(
                429,
                f"key {caller.name!r} is over its limit of {caller.requests_per_minute} requests a minute; retry "
                f"in {wait_s} s, or ask for a higher requests_per_minute",
                type=RATE_LIMIT,
                code="rate_limit_exceeded",
                headers={"Retry-After": str(wait_s)},
            )
        if caller.max_concurrent is not None and caller.in_flight >= caller.max_concurrent:
            raise OpenAIError(
                429,
                f"key {caller.name!r} already has {caller.in_flight} requests running, its limit; wait for one to "
                "finish, or ask for a higher max_concurrent",
                type=RATE_LIMIT,
                code="concurrency_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        caller.recent.append(now)
        caller.in_flight += 1
        try:
            yield
        finally:
            caller.in_flight -= 1


def read_keys_file(path: Path) -> list[ApiKey]:
    """A keys file: a JSON list of key objects (``name``, ``key_sha256`` or ``key``, ``models``, limits).

    Raises:
        SettingsError: the file cannot be read or does not hold valid keys.
    """
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return TypeAdapter(list[ApiKey]).validate_python(raw)
    except OSError as exc:
        raise SettingsError(f"cannot read GPUFLEET_API__KEYS_FILE {str(path)!r}: {exc}; fix the path") from None
    except json.JSONDecodeError as exc:
        raise SettingsError(f"GPUFLEET_API__KEYS_FILE {str(path)!r} is not JSON: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SettingsError(
            f"GPUFLEET_API__KEYS_FILE {str(path)!r} must be a JSON list of keys "
            f'([{{"name": ..., "key_sha256": ...}}]): {problems}'
        ) from None
