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
    gpufleet:fleet:queues           HASH  worker name -> {"name", "type_queue", "direct_queue"} JSON, no TTL
    gpufleet:fleet:departed         ZSET  that JSON -> when the worker left (removed or claimed)
    gpufleet:fleet:holders          ZSET  held-set key -> until when its holder is alive (Redis broker only)
    gpufleet:fleet:held:<name>:<id> SET   delivery tags one broker channel of a worker holds unacknowledged
    gpufleet:fleet:fenced:<name>:<id>  STRING  when that holder was claimed (its resumed owner must stop)
    gpufleet:deliveries:<job id>    STRING  times a job was redelivered (result backend's Redis; poison jobs)
    gpufleet:stream:<job id>        STREAM  a streamed job's text deltas, then its end (result backend's Redis,
                                    bounded length, expires with the job's result: gpufleet.tasks.streams)

The queues hash outlives a dead worker's record on purpose: whoever claims the dead worker
(:meth:`FleetRegistry.claim_expired`) learns from it which direct queue to move back to the type queue. The
departed set lets live workers keep moving jobs that kombu gives back to a departed worker's direct queue.

The held sets live in the broker's Redis (under kombu's ``global_keyprefix``), written by the worker's broker
channel in the same transaction as kombu's own ``unacked`` entry; :mod:`gpufleet.workers.parent.recovery` restores a
dead holder's deliveries at once instead of after the transport's visibility timeout.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gpufleet.gpu.units import fmt_bytes
from gpufleet.tasks.errors import BrokerAuthenticationError, BrokerUnavailableError
from gpufleet.tasks.settings import redact_url

if TYPE_CHECKING:
    from gpufleet.tasks.settings import Settings

INDEX_KEY = "gpufleet:fleet:index"
WORKER_KEY_PREFIX = "gpufleet:fleet:worker:"
QUEUES_KEY = "gpufleet:fleet:queues"
DEPARTED_KEY = "gpufleet:fleet:departed"
HOLDERS_KEY = "gpufleet:fleet:holders"
HELD_KEY_PREFIX = "gpufleet:fleet:held:"
FENCE_KEY_PREFIX = "gpufleet:fleet:fenced:"
DELIVERIES_KEY = "gpufleet:deliveries:{job_id}"  # formatted with the job id
STREAM_KEY = "gpufleet:stream:{job_id}"  # formatted with the job id

Holding = Literal["resident", "parked"]


def worker_key(name: str) -> str:
    """The registry key of one worker's record."""
    return WORKER_KEY_PREFIX + name


def held_key(worker: str, channel_id: str) -> str:
    """The set of delivery tags one broker channel of ``worker`` holds (one channel per connection)."""
    return f"{HELD_KEY_PREFIX}{worker}:{channel_id}"


def fence_key(held: str) -> str:
    """The fence a claimer writes for the holder of ``held`` (a :func:`held_key`)."""
    return FENCE_KEY_PREFIX + held.removeprefix(HELD_KEY_PREFIX)


class _Record(BaseModel):
    # Unknown fields are ignored so a newer worker's record still reads on an older producer.
    model_config = ConfigDict(extra="ignore", frozen=True)


class HeldModel(_Record):
    """A model a worker holds, on its device (resident) or in pinned host memory (parked)."""

    model: str
    bytes: int = Field(ge=0)
    pinned: bool = False


# Upper bounds (seconds) of the generation engine's latency histograms: time to first token, between tokens.
TOKEN_LATENCY_S_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class GenerationMetrics(_Record):
    """One model's continuous-batching engine on one worker: counters since the pool child started, and now.

    Histograms are Prometheus-style cumulative counts by upper bound (seconds as text, ``"+Inf"`` included) with
    their sum; ``"+Inf"`` is the count.
    """

    prompt_tokens: int = Field(default=0, ge=0)  # prompt tokens of the sequences served
    prefill_tokens: int = Field(default=0, ge=0)  # of those, computed (a shared prefix is computed once)
    generated_tokens: int = Field(default=0, ge=0)
    sequences_running: int = Field(default=0, ge=0)
    sequences_waiting: int = Field(default=0, ge=0)
    kv_used_bytes: int = Field(default=0, ge=0)  # what the running batch's KV cache holds now
    kv_reserved_bytes: int = Field(default=0, ge=0)  # the engine's KV reservation in the worker's memory budget
    ttft_s_buckets: dict[str, int] = Field(default_factory=dict)
    ttft_s_sum: float = 0.0
    itl_s_buckets: dict[str, int] = Field(default_factory=dict)
    itl_s_sum: float = 0.0

    @property
    def kv_free_bytes(self) -> int:
        return max(0, self.kv_reserved_bytes - self.kv_used_bytes)


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
    # Stopping gracefully: it takes no new jobs (the router skips it at once) but still beats for those it runs,
    # so no peer takes it for dead and restores them; it leaves the registry when they are done.
    draining: bool = False
    running_job: RunningJob | None = None
    backlog: int = Field(default=0, ge=0)  # jobs waiting on its direct queue, plus those it reserved, not started
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
    generation: dict[str, GenerationMetrics] = Field(default_factory=dict)  # by model
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


class ClaimedWorker(_Record):
    """A dead worker one caller claimed, with the queues it published (None if it published none)."""

    name: str
    type_queue: str | None = None
    direct_queue: str | None = None


class FleetSnapshot(_Record):
    """The fleet as read at one moment: every worker whose record had not expired."""

    workers: tuple[WorkerRecord, ...] = ()
    read_at: float

    def live(self) -> tuple[WorkerRecord, ...]:
        """Workers still within their TTL at ``read_at``, ready ones first, then by name."""
        alive = [w for w in self.workers if w.expires_at > self.read_at]
        return tuple(sorted(alive, key=lambda w: (not w.ready, w.name)))

    def ready(self) -> tuple[WorkerRecord, ...]:
        """Live workers that are warm and consuming their queues (a draining one consumes nothing new)."""
        return tuple(w for w in self.live() if w.ready and not w.draining)

    def routable(self) -> tuple[WorkerRecord, ...]:
        """Live workers a job may be sent to: all but those draining (stopping), ready ones first."""
        return tuple(w for w in self.live() if not w.draining)

    def get(self, name: str) -> WorkerRecord | None:
        return next((w for w in self.live() if w.name == name), None)


def describe(record: WorkerRecord, *, now: float) -> str:
    """One line about a worker for a person: name, type, readiness, memory, models, running job, backlog.

    Args:
        record: the worker's heartbeat.
        now: seconds since the epoch (for the running job's age).

    Returns:
        e.g. ``cpu-0@box  cpu  ready  mem 86.7 MiB / 12.0 GiB / 15.6 GiB  resident: org/a (86.7 MiB, pinned)
        job: fleet.embed 1f2e3d4c (org/a, 2.1 s)  backlog 0``.
    """

    def held(models: tuple[HeldModel, ...]) -> str:
        shown = [f"{m.model} ({fmt_bytes(m.bytes)}{', pinned' if m.pinned else ''})" for m in models]
        return ", ".join(shown) or "none"

    readiness = "DRAINING" if record.draining else "ready" if record.ready else "NOT READY"
    memory = (
        f"mem {fmt_bytes(record.memory_used_bytes)} / {fmt_bytes(record.memory_budget_bytes)} / "
        f"{fmt_bytes(record.memory_total_bytes)}"
    )
    gpus = f"x{record.gpu_count}" if record.gpu_count > 1 else ""
    parts = [record.name, record.gpu_type + gpus, readiness, memory, "resident: " + held(record.resident)]
    if record.parked:
        parts.append("parked: " + held(record.parked))
    job = record.running_job
    if job is None:
        parts.append("job: idle")
    else:
        on = f"{job.model}, " if job.model else ""
        parts.append(f"job: {job.task} {job.id[:8]} ({on}{max(0.0, now - job.started_at):.1f} s)")
    parts.append(f"backlog {record.backlog}")
    return "  ".join(parts)


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
        """Write a worker's heartbeat (and its queue names, which outlive the record).

        Raises:
            BrokerUnavailableError: Redis did not answer.
        """
        queues = _queues_json(record.name, record.type_queue, record.direct_queue)
        pipe = self._client.pipeline()
        pipe.set(worker_key(record.name), record.model_dump_json(), ex=max(1, math.ceil(record.ttl_s)))
        pipe.zadd(INDEX_KEY, {record.name: record.expires_at})
        pipe.hset(QUEUES_KEY, record.name, queues)
        pipe.zrem(DEPARTED_KEY, queues)  # back under the same name: it consumes its direct queue itself again
        self._run(pipe.execute, "publish the heartbeat of " + record.name)

    def remove(self, name: str) -> None:
        """Take a worker out of the fleet at once (graceful stop: it moves its direct queue itself).

        Its queue names move to the departed set, so live workers keep moving anything that still lands on its
        direct queue (see :meth:`departed`).

        Raises:
            BrokerUnavailableError: Redis did not answer.
        """
        script = (
            "redis.call('DEL', KEYS[1]) redis.call('ZREM', KEYS[2], ARGV[1]) "
            "local q = redis.call('HGET', KEYS[3], ARGV[1]) "
            "if q then redis.call('ZADD', KEYS[4], ARGV[2], q) redis.call('HDEL', KEYS[3], ARGV[1]) end "
            "return 1"
        )
        keys = (worker_key(name), INDEX_KEY, QUEUES_KEY, DEPARTED_KEY)
        self._run(lambda: self._client.eval(script, 4, *keys, name, self._clock()), "remove " + name)

    def expired(self, *, grace_s: float = 0.0) -> list[str]:
        """Workers in the index whose heartbeat expired over ``grace_s`` ago (dead, or stopped uncleanly).

        Args:
            grace_s: how long past its expiry a worker must be. A producer's cached snapshot may still show a
                worker for ``registry_cache_s`` after it expired, so a claimer waits that long before moving its
                direct queue, or a job routed from a stale snapshot would land there after the move.

        Raises:
            BrokerUnavailableError: Redis did not answer.
        """
        limit = self._clock() - grace_s
        names = self._run(lambda: self._client.zrangebyscore(INDEX_KEY, "-inf", limit), "list expired workers")
        return [_text(name) for name in names]

    def claim_expired(self, name: str, *, grace_s: float = 0.0) -> ClaimedWorker | None:
        """Take ``name`` out of the fleet if it is still expired (by ``grace_s``); exactly one caller wins.

        Whoever wins moves the dead worker's direct queue; a worker that heartbeats again in between has a fresh
        score and is not claimed. Its queue names move to the departed set (see :meth:`departed`).

        Returns:
            The dead worker and its queues for the one caller that claimed it; None for everyone else.

        Raises:
            BrokerUnavailableError: Redis did not answer.
        """
        script = (
            "local s = redis.call('ZSCORE', KEYS[1], ARGV[1]) "
            "if s and tonumber(s) <= tonumber(ARGV[2]) then "
            "redis.call('ZREM', KEYS[1], ARGV[1]) "
            "local q = redis.call('HGET', KEYS[2], ARGV[1]) "
            "if q then redis.call('ZADD', KEYS[3], ARGV[3], q) redis.call('HDEL', KEYS[2], ARGV[1]) end "
            "return {1, q} end "
            "return {0}"
        )
        now = self._clock()
        keys = (INDEX_KEY, QUEUES_KEY, DEPARTED_KEY)
        reply = self._run(lambda: self._client.eval(script, 3, *keys, name, now - grace_s, now), "claim " + name)
        if not reply or int(reply[0]) != 1:
            return None
        claimed = _claimed(reply[1] if len(reply) > 1 else None)
        return claimed if claimed is not None and claimed.name == name else ClaimedWorker(name=name)

    def departed(self, *, retention_s: float) -> list[ClaimedWorker]:
        """Workers that left (stopped or claimed) within ``retention_s``, with their queues.

        Kombu puts a job it gives back (a consumer lost, or past the visibility timeout) on the queue it was first
        sent to, which for a job sent to a direct queue is that worker's, even after it was moved to the type
        queue. Live workers check these queues each heartbeat and move what lands there. Older entries are
        dropped: pass at least the broker's visibility timeout.

        Raises:
            BrokerUnavailableError: Redis did not answer.
        """
        limit = self._clock() - retention_s

        def read() -> list[Any]:
            pipe = self._client.pipeline()
            pipe.zremrangebyscore(DEPARTED_KEY, "-inf", f"({limit}")
            pipe.zrange(DEPARTED_KEY, 0, -1)
            return list(pipe.execute()[1])

        workers = (_claimed(raw) for raw in self._run(read, "list departed workers"))
        return [worker for worker in workers if worker is not None]

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
            raise BrokerAuthenticationError(
                f"could not {what}: authentication to the fleet registry at {redact_url(self.url)} failed ({exc}); "
                "check the password in GPUFLEET_BROKER_URL (or GPUFLEET_RESULT_BACKEND when the broker is not Redis)"
            ) from exc
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise BrokerUnavailableError(
                f"could not {what}: the fleet registry at {redact_url(self.url)} did not answer ({exc}); start Redis "
                "or point GPUFLEET_BROKER_URL (or GPUFLEET_RESULT_BACKEND) at a running one"
            ) from exc


def _queues_json(name: str, type_queue: str, direct_queue: str) -> str:
    # One spelling per worker: the departed set is keyed by this exact text (publish removes it by value).
    return json.dumps({"name": name, "type_queue": type_queue, "direct_queue": direct_queue}, sort_keys=True)


def _claimed(raw: Any) -> ClaimedWorker | None:
    if raw is None:
        return None
    try:
        return ClaimedWorker.model_validate_json(_text(raw))
    except ValueError:
        return None  # unreadable: nothing known to move


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
