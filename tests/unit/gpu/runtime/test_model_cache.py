"""ModelCache: byte-weighted LRU with pins, idle expiry, feasibility-first eviction, hooks, usage and stats."""

from __future__ import annotations

import json
import threading

import pytest

from gpufleet.gpu.errors import AllPinnedError, BudgetExceededError, ConfigError
from gpufleet.gpu.runtime.model_cache import ModelCache
from gpufleet.gpu.units import GiB
from tests.support.clock import FakeClock


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    def __call__(self, key: str, value: str, reason: str) -> None:
        self.calls.append((key, value, reason))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def hook() -> Recorder:
    return Recorder()


@pytest.fixture
def cache(clock: FakeClock, hook: Recorder) -> ModelCache[str]:
    return ModelCache(100, on_evict=hook, clock=clock)


def lru_order(cache: ModelCache[str]) -> list[str]:
    """Resident keys, least recently used first (entries() lists the most recent first)."""
    return [entry["key"] for entry in reversed(cache.entries())]


def is_pinned(cache: ModelCache[str], key: str) -> bool:
    return any(entry["key"] == key and entry["pinned"] for entry in cache.entries())


def test_put_get_and_occupancy(cache: ModelCache[str]) -> None:
    assert cache.put("a", "A", 30) == []
    assert cache.put("b", "B", 20) == []
    assert cache.get("a") == "A"
    assert "a" in cache and "z" not in cache
    assert len(cache) == 2
    assert (cache.used_bytes, cache.capacity_bytes) == (50, 100)
    assert cache.size_of("b") == 20 and cache.size_of("z") is None


def test_lru_order_follows_get_not_peek(cache: ModelCache[str]) -> None:
    for key in "abc":
        cache.put(key, key.upper(), 10)
    assert lru_order(cache) == ["a", "b", "c"]
    cache.get("a")
    assert lru_order(cache) == ["b", "c", "a"]
    assert cache.peek("b") == "B"
    assert lru_order(cache) == ["b", "c", "a"]
    assert cache.stats().hits == 1  # peek does not count


def test_eviction_takes_least_recently_used_until_it_fits(cache: ModelCache[str], hook: Recorder) -> None:
    cache.put("a", "A", 40)
    cache.put("b", "B", 40)
    cache.get("a")  # b is now the oldest
    evicted = cache.put("c", "C", 50)
    assert evicted == ["b"]
    assert hook.calls == [("b", "B", "lru")]
    assert lru_order(cache) == ["a", "c"]
    assert cache.used_bytes == 90


def test_make_room_evicts_several_and_returns_them_in_order(cache: ModelCache[str]) -> None:
    for key in "abcd":
        cache.put(key, key, 25)
    assert cache.make_room(60, for_key="new") == ["a", "b", "c"]
    assert cache.used_bytes == 25


def test_pinned_entries_are_never_evicted(cache: ModelCache[str], hook: Recorder) -> None:
    cache.put("priority", "P", 40, pinned=True)
    cache.put("b", "B", 40)
    assert cache.put("c", "C", 50) == ["b"]
    assert is_pinned(cache, "priority")
    assert "priority" in cache
    assert hook.calls == [("b", "B", "lru")]


def test_all_pinned_error_has_no_side_effects(cache: ModelCache[str], hook: Recorder) -> None:
    cache.put("p1", "P1", 30, pinned=True)
    cache.put("p2", "P2", 30, pinned=True)
    cache.put("u", "U", 20)
    with pytest.raises(AllPinnedError) as info:
        cache.make_room(50, for_key="big")
    message = str(info.value)
    assert "'big'" in message and "p1" in message and "p2" in message
    assert "30 B" in message and "50 B" in message  # sizes of the pinned, and the need
    assert "unload" in message and "route" in message
    # The unpinned one would have been evicted had the plan been carried out: it must still be there.
    assert lru_order(cache) == ["p1", "p2", "u"]
    assert hook.calls == []
    assert cache.stats().evictions == 0


def test_capacity_error_when_bigger_than_whole_budget(cache: ModelCache[str], hook: Recorder) -> None:
    cache.put("a", "A", 10)
    with pytest.raises(BudgetExceededError) as info:
        cache.put("huge", "H", 101)
    assert not isinstance(info.value, AllPinnedError)
    assert "whole budget" in str(info.value) and "quantized" in str(info.value)
    assert lru_order(cache) == ["a"] and hook.calls == []


def test_capacity_error_message_in_gib() -> None:
    cache: ModelCache[str] = ModelCache(80 * GiB)
    with pytest.raises(BudgetExceededError, match=r"needs 140\.0 GiB.*80\.0 GiB"):
        cache.make_room(140 * GiB, for_key="org/big")


def test_expired_entries_go_first_even_if_recently_used(
    cache: ModelCache[str], clock: FakeClock, hook: Recorder
) -> None:
    cache.put("old", "O", 40)
    cache.put("short", "S", 40, ttl_s=5)
    clock.advance(10)  # "short" is now expired although more recently used than "old"
    assert cache.put("new", "N", 30) == ["short"]
    assert hook.calls == [("short", "S", "expired")]
    assert lru_order(cache) == ["old", "new"]
    assert cache.stats().expirations == 1


def test_ttl_is_idle_time_and_get_refreshes_it(cache: ModelCache[str], clock: FakeClock) -> None:
    cache.put("a", "A", 10, ttl_s=10)
    clock.advance(8)
    assert cache.get("a") == "A"
    clock.advance(8)  # 16 s since put, 8 s since last use
    assert cache.get("a") == "A"
    clock.advance(10)
    assert cache.get("a") is None
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.expirations, stats.entries) == (2, 1, 1, 0)


def test_pinned_entries_do_not_expire_and_unpinning_restarts_idle_time(
    cache: ModelCache[str], clock: FakeClock
) -> None:
    value = "P"
    cache.put("p", value, 10, pinned=True, ttl_s=5)
    clock.advance(100)
    assert cache.expire() == []
    cache.put("p", value, 10, ttl_s=5)  # the same model put again unpinned: its idle time counts from now
    assert not is_pinned(cache, "p")
    assert cache.expire() == []
    clock.advance(6)
    assert cache.expire() == ["p"]


def test_idle_ttl_of_the_cache_applies_to_every_entry(clock: FakeClock, hook: Recorder) -> None:
    cache: ModelCache[str] = ModelCache(100, idle_ttl_s=10, on_evict=hook, clock=clock)
    assert cache.idle_ttl_s == 10
    cache.put("a", "A", 10)
    cache.put("b", "B", 10, ttl_s=60)  # a per-entry TTL wins
    cache.put("p", "P", 10, pinned=True)
    assert [entry["expires_in_s"] for entry in cache.entries()] == [None, 60.0, 10.0]
    clock.advance(9)
    assert cache.expire() == []
    assert cache.get("a") == "A"  # used: idle time restarts
    clock.advance(9)
    assert cache.expire() == []
    clock.advance(1)
    assert cache.expire() == ["a"]
    assert hook.calls == [("a", "A", "expired")]
    clock.advance(100)
    assert cache.expire() == ["b"]
    assert lru_order(cache) == ["p"]


def test_no_idle_ttl_means_nothing_expires(cache: ModelCache[str], clock: FakeClock) -> None:
    assert cache.idle_ttl_s is None
    cache.put("a", "A", 10)
    clock.advance(10**9)
    assert cache.expire() == []
    assert cache.get("a") == "A"


def test_expire_sweeps_only_expired(cache: ModelCache[str], clock: FakeClock, hook: Recorder) -> None:
    cache.put("a", "A", 10, ttl_s=1)
    cache.put("b", "B", 10)
    clock.advance(2)
    assert cache.expire() == ["a"]
    assert hook.calls == [("a", "A", "expired")]


def test_failed_make_room_does_not_evict_expired_either(cache: ModelCache[str], clock: FakeClock) -> None:
    cache.put("p", "P", 80, pinned=True)
    cache.put("e", "E", 10, ttl_s=1)
    clock.advance(5)
    with pytest.raises(AllPinnedError):
        cache.make_room(50, for_key="x")
    assert lru_order(cache) == ["p", "e"]


def test_put_replaces_existing_key(cache: ModelCache[str], hook: Recorder) -> None:
    cache.put("a", "A1", 60)
    cache.put("b", "B", 30)
    # The old "a" bytes count as free: 60 + 30 used, replacing a with 70 fits without evicting b.
    assert cache.put("a", "A2", 70) == []
    assert hook.calls == [("a", "A1", "unload")]
    assert cache.peek("a") == "A2"
    assert cache.used_bytes == 100
    assert lru_order(cache) == ["b", "a"]


def test_put_same_object_updates_metadata_without_hook(cache: ModelCache[str], hook: Recorder) -> None:
    value = "A"
    cache.put("a", value, 10, load_s=2.0)
    cache.get("a")
    cache.put("a", value, 12, pinned=True)
    assert hook.calls == []
    assert is_pinned(cache, "a") and cache.used_bytes == 12 and cache.size_of("a") == 12
    stats = cache.stats()
    assert stats.loads == 1 and stats.load_s_total == 2.0
    assert cache.entries()[0]["hits"] == 1


def test_make_room_never_evicts_for_key(cache: ModelCache[str]) -> None:
    cache.put("a", "A", 60)
    cache.put("b", "B", 30)
    assert cache.make_room(40, for_key="a") == ["b"]
    with pytest.raises(BudgetExceededError, match="put"):
        cache.make_room(50, for_key="a")
    assert lru_order(cache) == ["a"]


def test_pop_unloads_even_pinned(cache: ModelCache[str], hook: Recorder) -> None:
    cache.put("p", "P", 10, pinned=True)
    assert cache.pop("p") == "P"
    assert cache.pop("p") is None
    assert hook.calls == [("p", "P", "unload")]
    assert cache.stats().unloads == 1 and cache.used_bytes == 0


def test_evict_unpinned_for_oom(cache: ModelCache[str], hook: Recorder) -> None:
    cache.put("p", "P", 10, pinned=True)
    cache.put("a", "A", 10)
    cache.put("b", "B", 10)
    assert cache.evict_unpinned() == ["a", "b"]
    assert [reason for _, _, reason in hook.calls] == ["oom", "oom"]
    assert lru_order(cache) == ["p"]
    with pytest.raises(ConfigError):
        cache.evict_unpinned("because")


def test_clear_removes_everything(cache: ModelCache[str], hook: Recorder) -> None:
    cache.put("p", "P", 10, pinned=True)
    cache.put("a", "A", 10)
    assert cache.clear() == ["p", "a"]
    assert len(cache) == 0 and cache.used_bytes == 0
    assert {reason for _, _, reason in hook.calls} == {"unload"}


def test_pin(cache: ModelCache[str], hook: Recorder) -> None:
    cache.put("a", "A", 60)
    cache.pin("a")
    with pytest.raises(AllPinnedError):
        cache.put("b", "B", 50)
    assert hook.calls == []
    with pytest.raises(KeyError, match="nope"):
        cache.pin("nope")


def test_hook_failure_is_logged_not_raised(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    def broken(key: str, value: str, reason: str) -> None:
        raise RuntimeError("cleanup failed")

    cache: ModelCache[str] = ModelCache(10, on_evict=broken, clock=clock)
    cache.put("a", "A", 10)
    assert cache.put("b", "B", 10) == ["a"]
    assert "on_evict hook failed" in caplog.text
    assert lru_order(cache) == ["b"]


def test_hook_may_reenter_the_cache(clock: FakeClock) -> None:
    seen: list[int] = []
    cache: ModelCache[str]

    def reentrant(key: str, value: str, reason: str) -> None:
        seen.append(cache.used_bytes)

    cache = ModelCache(10, on_evict=reentrant, clock=clock)
    cache.put("a", "A", 10)
    cache.put("b", "B", 5)
    assert seen == [0]


def test_stats_and_hit_ratio(cache: ModelCache[str]) -> None:
    assert cache.stats().hit_ratio == 0.0
    cache.put("a", "A", 10, pinned=True, load_s=1.5)
    cache.put("b", "B", 20, load_s=0.5)
    cache.get("a")
    cache.get("a")
    cache.get("b")
    cache.get("missing")
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (3, 1)
    assert stats.hit_ratio == pytest.approx(0.75)
    assert stats.loads == 2 and stats.load_s_total == pytest.approx(2.0)
    assert (stats.entries, stats.pinned, stats.pinned_bytes) == (2, 1, 10)
    assert (stats.used_bytes, stats.capacity_bytes) == (30, 100)
    data = stats.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert set(data) >= {"hits", "misses", "evictions", "expirations", "loads", "load_s_total", "entries"}


def test_usage_is_kept_per_model_across_loads_and_evictions(cache: ModelCache[str], clock: FakeClock) -> None:
    assert cache.get("a") is None  # a miss, before any load
    cache.put("a", "A1", 60, load_s=1.5)
    clock.advance(1)
    assert cache.get("a") == "A1"
    assert cache.get("a") == "A1"
    cache.put("b", "B", 60, load_s=0.5)  # evicts "a"
    clock.advance(2)
    assert cache.get("a") is None
    cache.put("a", "A2", 60, load_s=0.25)  # loaded again, evicting "b"
    clock.advance(3)
    usage = cache.usage()
    assert set(usage) == {"a", "b"}
    assert usage["a"] == {
        "hits": 2,
        "misses": 2,
        "loads": 2,
        "last_load_s": 0.25,
        "load_s_total": 1.75,
        "last_used_s_ago": 3.0,
        "resident": True,
    }
    assert usage["b"]["loads"] == 1 and usage["b"]["hits"] == 0 and usage["b"]["resident"] is False
    assert usage["b"]["last_used_s_ago"] == 5.0
    assert json.loads(json.dumps(usage)) == usage
    # The cache-wide counters are the sums of the per-model records, not a second count.
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.loads, stats.load_s_total) == (2, 2, 3, 2.25)


def test_a_miss_on_an_unknown_key_is_recorded_without_a_load(cache: ModelCache[str]) -> None:
    assert cache.get("never-loaded") is None
    assert cache.usage()["never-loaded"] == {
        "hits": 0,
        "misses": 1,
        "loads": 0,
        "last_load_s": None,
        "load_s_total": 0.0,
        "last_used_s_ago": None,
        "resident": False,
    }


def test_entries_snapshot_most_recent_first(cache: ModelCache[str], clock: FakeClock) -> None:
    cache.put("a", "A", 10, ttl_s=60, load_s=1.0)
    clock.advance(5)
    cache.put("b", "B", 20, pinned=True, ttl_s=60)
    clock.advance(2)
    cache.get("a")
    clock.advance(1)
    snapshot = cache.entries()
    assert [entry["key"] for entry in snapshot] == ["a", "b"]
    a, b = snapshot
    assert a == {
        "key": "a",
        "size_bytes": 10,
        "pinned": False,
        "hits": 1,
        "last_used_s_ago": 1.0,
        "loaded_s_ago": 8.0,
        "expires_in_s": 59.0,
        "load_s": 1.0,
    }
    assert b["pinned"] is True and b["expires_in_s"] is None
    assert json.loads(json.dumps(snapshot)) == snapshot


def test_invalid_arguments() -> None:
    with pytest.raises(ConfigError):
        ModelCache(0)
    cache: ModelCache[str] = ModelCache(10)
    with pytest.raises(ConfigError):
        cache.put("a", "A", -1)
    with pytest.raises(ConfigError):
        cache.put("a", "A", 1, ttl_s=0)
    with pytest.raises(ConfigError, match="IDLE_TTL_S"):
        ModelCache(10, idle_ttl_s=0)


def test_thread_safety_smoke() -> None:
    evicted: list[str] = []
    cache: ModelCache[int] = ModelCache(1000, on_evict=lambda key, value, reason: evicted.append(key))
    errors: list[BaseException] = []

    def worker(offset: int) -> None:
        try:
            for i in range(300):
                key = f"m{(offset + i) % 40}"
                if cache.get(key) is None:
                    cache.put(key, i, 25 + (i % 3) * 25)
                cache.stats()
                cache.entries()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n * 7,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert cache.used_bytes <= cache.capacity_bytes
    assert cache.used_bytes == sum(entry["size_bytes"] for entry in cache.entries())
    stats = cache.stats()
    assert stats.hits + stats.misses == 8 * 300
    assert stats.loads - stats.evictions - stats.unloads == len(cache)


def test_imports_without_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import gpufleet.gpu.runtime.model_cache, gpufleet.gpu.runtime.cache_stats; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.stdout.strip() == "ok", result.stderr
