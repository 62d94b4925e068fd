"""A byte-weighted LRU cache of loaded models: the one record of what is resident (no torch).

The cache owns the facts about resident models: their sizes, pins, recency and idle expiry, per-model usage
(:meth:`ModelCache.usage`: hits, misses, loads, load times, last use) and the cache-wide counters
(:meth:`ModelCache.stats`). The memory pool reads the resident total from here instead of keeping its own copy.

Modelled on vLLM's ``utils/cache.py`` ``LRUCache``: capacity is counted in bytes rather than entries, pinned
entries are never evicted, every removal goes through one hook (here ``on_evict``, which is where the worker
frees device memory, or the parked store frees host memory), and :meth:`ModelCache.stats` reports a hit ratio.

Two choices differ from a plain LRU and are worth knowing:

* **Feasibility first.** :meth:`ModelCache.make_room` decides the whole eviction plan before it evicts
  anything. If the plan cannot succeed (the model is bigger than the budget, or what is left is pinned), it
  raises and the cache is untouched: a job that cannot run must not cost every other job its warm model.
* **Idle expiry.** ``idle_ttl_s`` is an *idle* time-to-live: an entry expires that many seconds after it was
  last used, so a model in steady use never expires and one nobody asked for is unloaded. Pinned entries never
  expire. Expired entries are evicted on :meth:`~ModelCache.get`, :meth:`~ModelCache.make_room` and
  :meth:`~ModelCache.expire`; the cache starts no thread (the worker calls :meth:`~ModelCache.expire` from a
  timer).

Every method takes one re-entrant lock, so remote-control commands may read :meth:`~ModelCache.stats` and
:meth:`~ModelCache.entries` while a job runs. The hook is called while the lock is held (so no other thread
sees bytes as free before the hook has freed them); it may call back into the cache from the same thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from gpufleet.gpu.errors import AllPinnedError, BudgetExceededError, ConfigError
from gpufleet.gpu.runtime.cache_stats import EVICT_REASONS, CacheStats, EvictReason, ModelUsage
from gpufleet.gpu.units import fmt_bytes

__all__ = ["ModelCache"]

logger = logging.getLogger(__name__)

V = TypeVar("V")


@dataclass
class _Entry(Generic[V]):
    value: V
    size_bytes: int
    pinned: bool
    ttl_s: float | None
    loaded_at: float  # clock() when put
    last_used: float  # clock() when put or last hit
    load_s: float
    hits: int = 0  # since this load

    def expired(self, now: float) -> bool:
        return not self.pinned and self.ttl_s is not None and now - self.last_used >= self.ttl_s


class ModelCache(Generic[V]):
    """Byte-weighted LRU of loaded models with pins, idle expiry, usage records and an eviction hook.

    Args:
        capacity_bytes: how many bytes the cached values may hold together (the device budget for models).
        idle_ttl_s: idle seconds after which an unpinned entry expires; None (the default) never expires.
            :meth:`put` may override it per entry.
        on_evict: called as ``on_evict(key, value, reason)`` for every entry that leaves the cache, with
            ``reason`` one of :data:`~gpufleet.gpu.runtime.cache_stats.EVICT_REASONS`. Exceptions it raises are logged,
            not propagated: by then the entry is gone, and one failed cleanup must not fail the job that needed
            the room.
        clock: monotonic seconds; tests pass a fake one to drive expiry.

    Raises:
        ConfigError: ``capacity_bytes`` is not positive, or ``idle_ttl_s`` is not positive.
    """

    def __init__(
        self,
        capacity_bytes: int,
        *,
        idle_ttl_s: float | None = None,
        on_evict: Callable[[str, V, str], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity_bytes <= 0:
            raise ConfigError(f"cache capacity must be a positive number of bytes, got {capacity_bytes}")
        _check_ttl(idle_ttl_s, "the cache")
        self._capacity_bytes = capacity_bytes
        self._idle_ttl_s = idle_ttl_s
        self._on_evict = on_evict
        self._clock = clock
        self._lock = threading.RLock()
        # Oldest (least recently used) first: move_to_end on every hit keeps the order without a heap.
        self._entries: OrderedDict[str, _Entry[V]] = OrderedDict()
        self._usage: dict[str, ModelUsage] = {}
        self._used_bytes = 0
        self._evictions = 0
        self._expirations = 0
        self._unloads = 0

    # ----------------------------------------------------------------------------------------- occupancy

    @property
    def capacity_bytes(self) -> int:
        """The byte budget."""
        return self._capacity_bytes

    @property
    def idle_ttl_s(self) -> float | None:
        """The default idle time-to-live of entries (None: they never expire)."""
        return self._idle_ttl_s

    @property
    def used_bytes(self) -> int:
        """Bytes held by cached values (may exceed the budget after a measured size came out larger)."""
        with self._lock:
            return self._used_bytes

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def size_of(self, key: str) -> int | None:
        """The bytes recorded for ``key``, or None when it is not cached."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry.size_bytes

    # --------------------------------------------------------------------------------------------- reads

    def get(self, key: str, *, jobs: int = 1) -> V | None:
        """The cached value for ``key``, marking it most recently used and counting ``jobs`` hits or misses.

        Hits and misses count the jobs served, not lookups: a batch of 32 jobs on a resident model is 32 hits, a
        job that waits for its model to load is a miss. An expired entry is evicted (reason ``"expired"``) and
        counts as a miss.

        Args:
            key: the model id.
            jobs: how many jobs this lookup serves (a batch's size; 0 counts nothing).

        Returns:
            The value, or None on a miss.
        """
        with self._lock:
            usage = self._usage.setdefault(key, ModelUsage())
            entry = self._entries.get(key)
            now = self._clock()
            if entry is not None and entry.expired(now):
                self._remove(key, "expired")
                entry = None
            if entry is None:
                usage.misses += jobs
                return None
            entry.hits += jobs
            entry.last_used = now
            usage.hits += jobs
            usage.last_used = now
            self._entries.move_to_end(key)
            return entry.value

    def peek(self, key: str) -> V | None:
        """The cached value for ``key`` without counting a hit, touching LRU order or expiring it."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry.value

    # -------------------------------------------------------------------------------------------- writes

    def make_room(self, size_bytes: int, *, for_key: str) -> list[str]:
        """Evict until ``size_bytes`` fit: expired entries first, then least-recently-used unpinned ones.

        Nothing is evicted unless the whole plan succeeds. ``for_key`` itself is never evicted; if it is
        already cached, its current bytes are not counted as free (use :meth:`put` to replace it).

        Args:
            size_bytes: bytes the incoming model needs.
            for_key: the model the room is for (named in error messages).

        Returns:
            The evicted keys, in eviction order.

        Raises:
            BudgetExceededError: ``size_bytes`` exceeds the whole budget; no eviction can help.
            AllPinnedError: even after evicting every unpinned entry the model would not fit.
        """
        with self._lock:
            return self._make_room(size_bytes, for_key=for_key, replacing_bytes=0)

    def put(
        self,
        key: str,
        value: V,
        size_bytes: int,
        *,
        pinned: bool = False,
        ttl_s: float | None = None,
        load_s: float = 0.0,
    ) -> list[str]:
        """Cache ``value`` under ``key``, evicting others to make room; a new value counts as a load of ``key``.

        Replacing an existing key with a *different* value passes the old value to ``on_evict`` with reason
        ``"unload"``; putting the same object again only updates its size, pin, TTL and recency.

        Args:
            key: the model id.
            value: the loaded model.
            size_bytes: bytes it holds (measured after loading).
            pinned: never evict or expire it (priority models); putting it again unpinned unpins it.
            ttl_s: idle seconds after which it expires; None takes the cache's ``idle_ttl_s``.
            load_s: how long loading took, for the usage records.

        Returns:
            The keys evicted to make room.

        Raises:
            ConfigError: ``size_bytes`` is negative or ``ttl_s`` is not positive.
            BudgetExceededError: ``size_bytes`` exceeds the whole budget.
            AllPinnedError: the rest of the cache is pinned and too little is free.
        """
        if size_bytes < 0:
            raise ConfigError(f"size_bytes for {key!r} must be >= 0, got {size_bytes}")
        _check_ttl(ttl_s, repr(key))
        with self._lock:
            old = self._entries.get(key)
            replacing_bytes = old.size_bytes if old is not None else 0
            evicted = self._make_room(size_bytes, for_key=key, replacing_bytes=replacing_bytes)
            now = self._clock()
            same = old if old is not None and old.value is value else None
            if old is not None and same is None:
                self._remove(key, "unload")
            elif same is not None:
                self._used_bytes -= same.size_bytes
                del self._entries[key]
            self._entries[key] = _Entry(
                value=value,
                size_bytes=size_bytes,
                pinned=pinned,
                ttl_s=ttl_s if ttl_s is not None else self._idle_ttl_s,
                loaded_at=same.loaded_at if same is not None else now,
                last_used=now,
                load_s=same.load_s if same is not None else load_s,
                hits=same.hits if same is not None else 0,
            )
            self._used_bytes += size_bytes
            usage = self._usage.setdefault(key, ModelUsage())
            usage.last_used = now
            if same is None:
                usage.loads += 1
                usage.last_load_s = load_s
                usage.load_s_total += load_s
            return evicted

    def pop(self, key: str) -> V | None:
        """Remove ``key`` on request (pinned or not), passing it to ``on_evict`` with reason ``"unload"``.

        Args:
            key: the model id.

        Returns:
            The removed value, or None when it was not cached.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._remove(key, "unload")
            return entry.value

    def clear(self) -> list[str]:
        """Remove every entry, pinned ones included (reason ``"unload"``), e.g. at worker shutdown.

        Returns:
            The removed keys, least recently used first.
        """
        with self._lock:
            keys = list(self._entries)
            for key in keys:
                self._remove(key, "unload")
            return keys

    def pin(self, key: str) -> None:
        """Never evict or expire ``key`` (until it is put again unpinned, or popped).

        Raises:
            KeyError: ``key`` is not cached.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                raise KeyError(f"{key!r} is not cached; put it before pinning it")
            entry.pinned = True

    def evict_unpinned(self, reason: str = "oom", *, keep: str | None = None) -> list[str]:
        """Evict every unpinned entry, e.g. after the device ran out of memory mid-job.

        Args:
            reason: passed to ``on_evict``; one of :data:`~gpufleet.gpu.runtime.cache_stats.EVICT_REASONS`.
            keep: an entry to leave in place (the model a running decode loop is using).

        Returns:
            The evicted keys, least recently used first.

        Raises:
            ConfigError: ``reason`` is not one of :data:`~gpufleet.gpu.runtime.cache_stats.EVICT_REASONS`.
        """
        if reason not in EVICT_REASONS:
            raise ConfigError(f"eviction reason {reason!r} is not one of {', '.join(EVICT_REASONS)}")
        with self._lock:
            keys = [key for key, entry in self._entries.items() if not entry.pinned and key != keep]
            for key in keys:
                self._remove(key, cast(EvictReason, reason))
            return keys

    def expire(self) -> list[str]:
        """Evict every entry idle for longer than its TTL now (reason ``"expired"``).

        Cheap when nothing expires (one pass over the entries under the lock, no device work), so a worker may
        call it from a timer; the eviction hook runs only for what expires.

        Returns:
            The expired keys, least recently used first.
        """
        with self._lock:
            now = self._clock()
            keys = [key for key, entry in self._entries.items() if entry.expired(now)]
            for key in keys:
                self._remove(key, "expired")
            return keys

    # ------------------------------------------------------------------------------------------- reports

    def stats(self) -> CacheStats:
        """Cache-wide counters and occupancy now (hits, misses and loads are the sums of :meth:`usage`)."""
        with self._lock:
            hits = sum(usage.hits for usage in self._usage.values())
            misses = sum(usage.misses for usage in self._usage.values())
            lookups = hits + misses
            pinned = [entry for entry in self._entries.values() if entry.pinned]
            return CacheStats(
                hits=hits,
                misses=misses,
                evictions=self._evictions,
                expirations=self._expirations,
                unloads=self._unloads,
                loads=sum(usage.loads for usage in self._usage.values()),
                load_s_total=sum(usage.load_s_total for usage in self._usage.values()),
                entries=len(self._entries),
                pinned=len(pinned),
                pinned_bytes=sum(entry.size_bytes for entry in pinned),
                used_bytes=self._used_bytes,
                capacity_bytes=self._capacity_bytes,
                hit_ratio=hits / lookups if lookups else 0.0,
            )

    def usage(self) -> dict[str, dict[str, Any]]:
        """Per model id ever looked up or put, resident or not: its lifetime usage, JSON-ready.

        Returns:
            ``{model_id: {"hits", "misses", "loads", "last_load_s", "load_s_total", "last_used_s_ago",
            "resident"}}``; see :meth:`~gpufleet.gpu.runtime.cache_stats.ModelUsage.to_dict`.
        """
        with self._lock:
            now = self._clock()
            return {key: usage.to_dict(now=now, resident=key in self._entries) for key, usage in self._usage.items()}

    def entries(self) -> list[dict[str, Any]]:
        """A JSON-ready snapshot of every resident entry, most recently used first.

        Returns:
            One dict per entry: ``key``, ``size_bytes``, ``pinned``, ``hits`` (since it was loaded),
            ``last_used_s_ago``, ``loaded_s_ago``, ``expires_in_s`` (None when it never expires; 0 when already
            expired) and ``load_s``.
        """
        with self._lock:
            now = self._clock()
            snapshot = []
            for key, entry in reversed(self._entries.items()):
                expires_in_s = None
                if entry.ttl_s is not None and not entry.pinned:
                    expires_in_s = max(0.0, entry.last_used + entry.ttl_s - now)
                snapshot.append(
                    {
                        "key": key,
                        "size_bytes": entry.size_bytes,
                        "pinned": entry.pinned,
                        "hits": entry.hits,
                        "last_used_s_ago": now - entry.last_used,
                        "loaded_s_ago": now - entry.loaded_at,
                        "expires_in_s": expires_in_s,
                        "load_s": entry.load_s,
                    }
                )
            return snapshot

    # ------------------------------------------------------------------------------------------ internals

    def _make_room(self, size_bytes: int, *, for_key: str, replacing_bytes: int) -> list[str]:
        """Plan, check, then evict; ``replacing_bytes`` are held by ``for_key``'s old entry, freed by put."""
        if size_bytes > self._capacity_bytes:
            raise BudgetExceededError(
                f"model {for_key!r} needs {fmt_bytes(size_bytes)}; the whole budget of this cache is "
                f"{fmt_bytes(self._capacity_bytes)}, so no eviction can make it fit; try a quantized variant "
                "or route it to a GPU with more memory"
            )
        now = self._clock()
        free = self._capacity_bytes - self._used_bytes + replacing_bytes
        expired = [k for k, e in self._entries.items() if k != for_key and e.expired(now)]
        plan: list[tuple[str, EvictReason]] = [(k, "expired") for k in expired]
        # Expired entries go whether or not they are needed: they are dead weight, and the next get would
        # evict them anyway.
        free += sum(self._entries[k].size_bytes for k in expired)
        if free < size_bytes:
            for key, entry in self._entries.items():  # least recently used first
                if key == for_key or entry.pinned or key in expired:
                    continue
                plan.append((key, "lru"))
                free += entry.size_bytes
                if free >= size_bytes:
                    break
        if free < size_bytes:
            raise self._no_room_error(size_bytes, for_key=for_key, free_after=free)
        for key, reason in plan:
            self._remove(key, reason)
        return [key for key, _ in plan]

    def _no_room_error(self, size_bytes: int, *, for_key: str, free_after: int) -> BudgetExceededError:
        pinned = [(k, e.size_bytes) for k, e in self._entries.items() if e.pinned and k != for_key]
        free_now = max(0, self._capacity_bytes - self._used_bytes)
        if not pinned:
            # Only possible when for_key itself (cached, unpinned) holds the rest of the budget.
            return BudgetExceededError(
                f"model {for_key!r} needs {fmt_bytes(size_bytes)}; {fmt_bytes(free_now)} of "
                f"{fmt_bytes(self._capacity_bytes)} is free and {for_key!r} is already cached; replace it "
                "with put() instead of making room beside it"
            )
        names = ", ".join(f"{k} ({fmt_bytes(b)})" for k, b in pinned)
        return AllPinnedError(
            f"model {for_key!r} needs {fmt_bytes(size_bytes)}; this cache has {fmt_bytes(free_now)} free of "
            f"{fmt_bytes(self._capacity_bytes)} and at most {fmt_bytes(max(0, free_after))} after evicting "
            f"every unpinned model, because pinned models hold the rest: {names}; unload one of them "
            f"(fleet.unload_model), or route {for_key!r} to another worker"
        )

    def _remove(self, key: str, reason: EvictReason) -> None:
        entry = self._entries.pop(key)
        self._used_bytes -= entry.size_bytes
        if reason == "expired":
            self._expirations += 1
        elif reason == "unload":
            self._unloads += 1
        else:
            self._evictions += 1
        if self._on_evict is None:
            return
        try:
            self._on_evict(key, entry.value, reason)
        except Exception:
            # The entry is already gone; failing the caller (often a job that only needed room) would not
            # bring it back. Log loudly so a leaking unload hook is noticed.
            logger.exception("on_evict hook failed for %r (reason %s)", key, reason)


def _check_ttl(ttl_s: float | None, owner: str) -> None:
    if ttl_s is not None and ttl_s <= 0:
        raise ConfigError(
            f"idle TTL for {owner} must be positive seconds or None (never expire), got {ttl_s}; set "
            "GPUFLEET_GPU__MEMORY_POOL__IDLE_TTL_S to a positive number or leave it unset"
        )
