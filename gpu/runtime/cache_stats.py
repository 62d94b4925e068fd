"""The records a :class:`~gpufleet.gpu.runtime.model_cache.ModelCache` keeps: why entries leave, per-model usage,
totals.

Plain dataclasses (no torch), JSON-ready through their ``to_dict`` methods.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["EVICT_REASONS", "CacheStats", "EvictReason", "ModelUsage"]

EvictReason = Literal["lru", "expired", "unload", "oom"]
"""Why an entry left the cache, as passed to ``on_evict``:

* ``"lru"`` — evicted to make room for another model;
* ``"expired"`` — idle longer than its TTL;
* ``"unload"`` — removed on request (``ModelCache.pop``, ``ModelCache.clear``) or replaced by ``ModelCache.put``;
* ``"oom"`` — dropped after the device ran out of memory (``ModelCache.evict_unpinned``).
"""

EVICT_REASONS: tuple[str, ...] = ("lru", "expired", "unload", "oom")


@dataclass
class ModelUsage:
    """What one model id did in a cache over its lifetime, across loads and evictions.

    ``last_used`` is the cache clock's reading (monotonic seconds), so it is reported relative to now.
    """

    hits: int = 0
    misses: int = 0
    loads: int = 0
    last_load_s: float | None = None
    load_s_total: float = 0.0
    last_used: float | None = None

    def to_dict(self, *, now: float, resident: bool) -> dict[str, Any]:
        """The record as a JSON-ready dict.

        Args:
            now: the cache clock now.
            resident: whether the model is in the cache now.

        Returns:
            ``hits``, ``misses``, ``loads``, ``last_load_s``, ``load_s_total``, ``last_used_s_ago`` (None when
            never used) and ``resident``.
        """
        return {
            "hits": self.hits,
            "misses": self.misses,
            "loads": self.loads,
            "last_load_s": self.last_load_s,
            "load_s_total": self.load_s_total,
            "last_used_s_ago": None if self.last_used is None else now - self.last_used,
            "resident": resident,
        }


@dataclass(frozen=True)
class CacheStats:
    """Counters and occupancy of a :class:`~gpufleet.gpu.runtime.model_cache.ModelCache` at one moment.

    ``evictions`` counts removals the cache chose (reasons ``lru`` and ``oom``); ``expirations`` and ``unloads``
    (explicit removals) are counted apart so an operator can tell thrashing from housekeeping.
    """

    hits: int
    misses: int
    evictions: int
    expirations: int
    unloads: int
    loads: int
    load_s_total: float
    entries: int
    pinned: int
    pinned_bytes: int
    used_bytes: int
    capacity_bytes: int
    hit_ratio: float

    def to_dict(self) -> dict[str, Any]:
        """The stats as a JSON-ready dict."""
        return asdict(self)
