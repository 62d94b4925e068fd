"""The live fleet: what each worker publishes about itself, and the registry producers read it from.

Each worker's parent process writes a :class:`WorkerRecord` every ``GPUFLEET_FLEET__HEARTBEAT_INTERVAL_S`` into
Redis (the broker's, or the result backend's when the broker is not Redis): one JSON key per worker with a TTL, and
an index (a sorted set of worker names scored by when their record expires) so a reader gets the whole fleet in
one round trip and anyone can see which workers stopped heartbeating. Readers go through a short-lived cache
(``GPUFLEET_FLEET__REGISTRY_CACHE_S``), so routing a job costs no round trip at steady state.

The records are plain pydantic models and :class:`FleetSnapshot` is a value: routing and the HTTP API are pure
functions over a snapshot, testable without Redis. Importable without torch.

Redis layout (database of the registry URL)::

    gpufleet:fleet:index            ZSET  worker name -> expires_at (unix seconds)
    gpufleet:fleet:worker:<name>    STRING  WorkerRecord JSON, EX = ttl
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.errors import BrokerUnavailableError
from tasks.settings import redact_url

if TYPE_CHECKING:
    from tasks.settings import Settings

INDEX_KEY = "gpufleet:fleet:index"
WORKER_KEY_PREFIX = "gpufleet:fleet:worker:"

Holding = Literal["resident", "parked"]


def worker_key(name: str) -> str:
    """The registry key of one worker's record."""
    return WORKER_KEY_PREFIX + name


class _Record(BaseModel):
    # Unknown fields are ignored so a newer worker's record still reads on an older producer.
    model_config = ConfigDict(extra="ignore", frozen=True)


class HeldModel(_Record):
    """A model a worker holds, on its device (resident) or in pinned host memory (parked)."""

    model: str
    bytes: int = Field(ge=0)
    pinned: bool = False


class RunningJob(_Record):
    """The job a worker's pool child is running."""

    id: str
    task: str
    model: str | None = None
    started_at: float


class WorkerRecord(_Record):
    """One worker as it describes itself in its heartbeat."""

    name: str
    host: str
    pid: int
    gpu_type: str  # catalog name ("h100", "cpu")
    gpu_indices: tuple[int, ...] = ()  # physical device indices it owns; empty on a CPU worker
    gpu_count: int = Field(default=1, ge=1)  # devices one model may span (1 on a CPU worker)
    device: str  # "cuda:0 (NVIDIA H100 80GB HBM3)" or "cpu"
    type_queue: str
    direct_queue: str
    memory_total_bytes: int = Field(default=0, ge=0)  # summed over its GPUs (host memory on a CPU worker)
    memory_budget_bytes: int = Field(default=0, ge=0)  # what the worker may fill with models
    memory_used_bytes: int = Field(default=0, ge=0)  # held by resident models
    resident: tuple[HeldModel, ...] = ()
    parked: tuple[HeldModel, ...] = ()
    ready: bool = False  # warm and consuming its queues
    warm: bool = False
    running_job: RunningJob | None = None
    backlog: int = Field(default=0, ge=0)  # jobs waiting on its direct queue
    jobs_done: int = Field(default=0, ge=0)
    # Cumulative counters since the pool child started, for /metrics: jobs by "task|outcome" (outcome: "ok" or
    # the contract error's class name), disk/parked loads by duration bucket ("le" upper bound in seconds as text,
    # Prometheus-style cumulative counts, "+Inf" included) with their sum, and the model cache's counters.
    jobs_by_outcome: dict[str, int] = Field(default_factory=dict)
    load_s_buckets: dict[str, int] = Field(default_factory=dict)
    load_s_sum: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_evictions: int = 0
    versions: dict[str, str] = Field(default_factory=dict)
    heartbeat_at: float
    ttl_s: float = Field(gt=0)

    @property
    def expires_at(self) -> float:
        return self.heartbeat_at + self.ttl_s

    @property
    def free_budget_bytes(self) -> int:
        return max(0, self.memory_budget_bytes - self.memory_used_bytes)

    def holds(self, model: str) -> Holding | None:
        """Whether this worker holds ``model``: on its device, parked in host memory, or not at all."""
        if any(held.model == model for held in self.resident):
            return "resident"
        if any(held.model == model for held in self.parked):
            return "parked"
        return None


class FleetSnapshot(_Record):
    """The fleet as read at one moment: every worker whose record had not expired."""

    workers: tuple[WorkerRecord, ...] = ()
    read_at: float

    def live(self) -> tuple[WorkerRecord, ...]:
        """Workers still within their TTL at ``read_at``, ready ones first, then by name."""
        alive = [w for w in self.workers if w.expires_at > self.read_at]
        return tuple(sorted(alive, key=lambda w: (not w.ready, w.name)))

    def ready(self) -> tuple[WorkerRecord, ...]:
        """Live workers that are warm and consuming their queues."""
        return tuple(w for w in self.live() if w.ready)

    def get(self, name: str) -> WorkerRecord | None:
        return next((w for w in self.live() if w.name == name), None)


def registry_url(settings: Settings) -> str | None:
    """Where the registry lives: the broker when it is Redis, else the result backend when that is; else None."""
    for url in (settings.broker_url, settings.result_backend):
        if url.startswith(("redis://", "rediss://", "unix://")):
            return url
    return None


class FleetRegistry:
    """Reads and writes the registry (see the module docstring for the layout).

    Args:
        url: a Redis URL (with its password and database).
        cache_s: how long :meth:`snapshot` answers from memory before reading Redis again.
        connect_timeout_s: socket connect and read timeout, so a dead Redis fails fast.
        clock: seconds since the epoch (tests pass a fake).
    """

    def __init__(
        self,
        url: str,
        *,
        cache_s: float = 1.0,
        connect_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        import redis

        self.url = url
        self.cache_s = cache_s
        self._clock = clock
        self._client = redis.Redis.from_url(
            url, socket_connect_timeout=connect_timeout_s, socket_timeout=connect_timeout_s
        )
        self._lock = threading.Lock()
        self._cached: FleetSnapshot | None = None
        self._cached_at = -math.inf

    @classmethod
    def from_settings(cls, settings: Settings) -> FleetRegistry | None:
        """The registry of these settings, or None when neither broker nor result backend is Redis."""
        url = registry_url(settings)
        if url is None:
            return None
        return cls(url, cache_s=settings.fleet.registry_cache_s, connect_timeout_s=settings.broker.connect_timeout_s)

    # -- writing (worker side) --------------------------------------------------------------------------

    def publish(self, record: WorkerRecord) -> None:
        """Write a worker's heartbeat.

        Raises:
            BrokerUnavailableError: Redis did not answer.
        """
        pipe = self._client.pipeline()
        pipe.set(worker_key(record.name), record.model_dump_json(), ex=max(1, math.ceil(record.ttl_s)))
        pipe.zadd(INDEX_KEY, {record.name: record.expires_at})
        self._run(pipe.execute, "publish the heartbeat of " + record.name)

    def remove(self, name: str) -> None:
        """Take a worker out of the fleet at once (graceful stop, or after its expiry was handled)."""
        pipe = self._client.pipeline()
        pipe.delete(worker_key(name))
        pipe.zrem(INDEX_KEY, name)
        self._run(pipe.execute, "remove " + name)

    def expired(self) -> list[str]:
        """Workers in the index whose heartbeat expired (dead, or stopped without removing themselves)."""
        names = self._run(lambda: self._client.zrangebyscore(INDEX_KEY, "-inf", self._clock()), "list expired")
        return [_text(name) for name in names]

    def claim_expired(self, name: str) -> bool:
        """Take ``name`` out of the index if it is still expired; True for exactly one caller fleet-wide.

        Whoever wins handles the dead worker's leftovers (its direct queue); a worker that heartbeats again in
        between has a fresh score and is not claimed.
        """
        script = (
            "local s = redis.call('ZSCORE', KEYS[1], ARGV[1]) "
            "if s and tonumber(s) <= tonumber(ARGV[2]) then redis.call('ZREM', KEYS[1], ARGV[1]) return 1 end "
            "return 0"
        )
        claimed = self._run(lambda: self._client.eval(script, 1, INDEX_KEY, name, self._clock()), "claim " + name)
        return bool(claimed)

    # -- reading (producer side) ------------------------------------------------------------------------

    def snapshot(self, *, max_age_s: float | None = None) -> FleetSnapshot:
        """The live fleet, from the cache when it is younger than ``max_age_s`` (default ``cache_s``).

        Raises:
            BrokerUnavailableError: Redis did not answer (and nothing cached is young enough).
        """
        limit_s = self.cache_s if max_age_s is None else max_age_s
        now = self._clock()
        with self._lock:
            if self._cached is not None and now - self._cached_at <= limit_s:
                return self._cached
        snapshot = self._read(now)
        with self._lock:
            self._cached, self._cached_at = snapshot, now
        return snapshot

    def _read(self, now: float) -> FleetSnapshot:
        def read() -> list[Any]:
            names = self._client.zrangebyscore(INDEX_KEY, now, "+inf")
            return list(self._client.mget([worker_key(_text(n)) for n in names])) if names else []

        records = []
        for raw in self._run(read, "read the fleet"):
            if raw is None:
                continue  # expired between the two reads
            try:
                records.append(WorkerRecord.model_validate_json(raw))
            except ValueError:
                continue  # a record this producer cannot read is not a worker it can route to
        return FleetSnapshot(workers=tuple(records), read_at=now)

    def _run(self, call: Callable[[], Any], what: str) -> Any:
        import redis

        try:
            return call()
        except redis.AuthenticationError as exc:
            raise BrokerUnavailableError(
                f"could not {what}: the fleet registry at {redact_url(self.url)} refused the password ({exc}); check "
                "the password in GPUFLEET_BROKER_URL (or GPUFLEET_RESULT_BACKEND when the broker is not Redis)"
            ) from exc
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise BrokerUnavailableError(
                f"could not {what}: the fleet registry at {redact_url(self.url)} did not answer ({exc}); start Redis "
                "or point GPUFLEET_BROKER_URL (or GPUFLEET_RESULT_BACKEND) at a running one"
            ) from exc


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
