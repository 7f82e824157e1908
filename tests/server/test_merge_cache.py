import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hotmerge.errors import InvalidArgument, ResourceExhausted
from hotmerge.merging.cache import MergeCache, split_budget
from hotmerge_kernels.layout import FlatAdapter


def adapter(rank: int = 2, width: int = 4) -> FlatAdapter:
    """A real one-module FlatAdapter of 2·rank·width float32 elements (16·rank·width bytes)."""
    tensors = {
        ("layer.q_proj", "A"): torch.randn(rank, width),
        ("layer.q_proj", "B"): torch.randn(width, rank),
    }
    return FlatAdapter.from_tensors(tensors, rank=rank, scaling=1.0)


SIZE = adapter().nbytes  # 128 bytes


def wait_until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.001)


def test_hit_and_miss():
    events = []
    cache = MergeCache(10 * SIZE, on_event=events.append)
    made = adapter()
    entry, hit, merge_ms = cache.get_or_merge("m-1", lambda: made)
    assert (entry.adapter, hit, entry.key, entry.nbytes) == (made, False, "m-1", SIZE)
    assert merge_ms >= 0 and entry.merge_ms == merge_ms
    again = cache.get_or_merge("m-1", lambda: pytest.fail("merged twice"))
    assert again.entry is entry and again.hit and again.merge_ms == 0.0
    assert events == ["miss", "hit"]
    s = cache.stats()
    assert (s.hits, s.misses, s.waits, s.entries, s.used_bytes) == (1, 1, 0, 1, SIZE)
    assert "m-1" in cache and len(cache) == 1


@pytest.mark.parametrize("pin", [False, True])
def test_single_flight(pin):
    n = 32
    calls = 0
    release = threading.Event()
    made = adapter()

    def merge():
        nonlocal calls
        calls += 1
        assert release.wait(5)
        return made

    cache = MergeCache(10 * SIZE)
    lookup = cache.acquire if pin else cache.get_or_merge
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(lookup, "m-hot", merge) for _ in range(n)]
        wait_until(lambda: cache.stats().waits == n - 1)  # all but the leader wait
        release.set()
        results = [f.result(timeout=5) for f in futures]

    assert calls == 1
    assert {id(r.entry) for r in results} == {id(results[0].entry)}
    assert results[0].entry.adapter is made
    assert not any(r.hit for r in results)  # nobody found it ready
    s = cache.stats()
    assert (s.misses, s.waits, s.hits, s.failures) == (1, n - 1, 0, 0)
    # the leader pinned for every waiter
    assert cache.pins(results[0].entry.key) == (n if pin else 0)
    for r in results if pin else []:
        cache.release(r.entry)
    assert cache.pins(results[0].entry.key) == 0


def test_failed_merge_reaches_all_waiters_and_is_not_cached():
    n = 16
    calls = 0
    release = threading.Event()

    def failing_merge():
        nonlocal calls
        calls += 1
        assert release.wait(5)
        raise InvalidArgument("merged_adapters.ids: ranks differ")

    events = []
    cache = MergeCache(10 * SIZE, on_event=events.append)
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(cache.acquire, "m-bad", failing_merge) for _ in range(n)]
        wait_until(lambda: cache.stats().waits == n - 1)
        release.set()
        errors = [f.exception(timeout=5) for f in futures]

    assert calls == 1
    assert all(isinstance(e, InvalidArgument) and "ranks differ" in str(e) for e in errors)
    assert "m-bad" not in cache and cache.used_bytes == 0
    assert cache.stats().failures == 1 and events.count("failure") == 1

    # the next lookup merges again
    made = adapter()
    result = cache.get_or_merge("m-bad", lambda: made)
    assert result.entry.adapter is made and not result.hit
    assert calls == 1 and cache.stats().misses == 2


def test_lru_eviction_by_bytes():
    events = []
    cache = MergeCache(3 * SIZE, on_event=events.append)
    for k in ("a", "b", "c"):
        cache.get_or_merge(k, adapter)
    cache.get_or_merge("a", adapter)  # a is now the most recent; b the least
    cache.get_or_merge("d", adapter)
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "abcd" if k in cache}
    assert cache.used_bytes == 3 * SIZE and cache.stats().evictions == 1
    assert events.count("evict") == 1

    # a big one (two slots) evicts the two least recent: c then a
    cache.get_or_merge("big", lambda: adapter(rank=4))
    assert [k for k in ("a", "c", "d", "big") if k in cache] == ["d", "big"]
    assert cache.used_bytes == 3 * SIZE and cache.stats().evictions == 3


def test_pinned_entry_is_not_evicted():
    cache = MergeCache(2 * SIZE)
    with cache.use("pinned", adapter) as (entry, hit, _):
        assert not hit and cache.pins(entry.key) == 1
        cache.get_or_merge("x", adapter)
        cache.get_or_merge("y", adapter)  # evicts x, the only unpinned entry
        cache.get_or_merge("z", adapter)
        assert "pinned" in cache and "x" not in cache and "y" not in cache and "z" in cache
        # pinned again by a second request, through the key alone
        with cache.use("pinned") as second:
            assert second.hit and second.entry is entry and cache.pins(entry.key) == 2
        assert cache.pins(entry.key) == 1
    assert cache.pins(entry.key) == 0
    cache.get_or_merge("w", adapter)  # evicts z: the second use made pinned more recent
    assert "z" not in cache and "pinned" in cache
    cache.get_or_merge("v", adapter)  # unpinned now, it can go
    assert "pinned" not in cache and cache.stats().pinned == 0


def test_resource_exhausted_when_everything_stays_pinned():
    cache = MergeCache(2 * SIZE, wait_for_room_s=0.05)
    a = cache.acquire("a", adapter)
    b = cache.acquire("b", adapter)
    with pytest.raises(ResourceExhausted, match="held by merged adapters in use"):
        cache.get_or_merge("c", adapter)
    assert "c" not in cache and cache.used_bytes == 2 * SIZE
    assert cache.stats().failures == 1
    cache.release(a.entry)
    cache.get_or_merge("c", adapter)
    assert "a" not in cache and "b" in cache and "c" in cache
    cache.release(b.entry)


def test_a_merge_waits_for_a_pinned_entry_to_be_released():
    cache = MergeCache(2 * SIZE, wait_for_room_s=30)
    a = cache.acquire("a", adapter)
    b = cache.acquire("b", adapter)
    releaser = threading.Timer(0.2, cache.release, args=(a.entry,))
    releaser.start()
    result = cache.get_or_merge("c", adapter)  # blocks until "a" is unpinned, then evicts it
    releaser.join()
    assert not result.hit and "c" in cache and "a" not in cache
    assert cache.stats().evictions == 1 and cache.stats().failures == 0
    cache.release(b.entry)


def test_nothing_is_evicted_when_the_new_entry_cannot_fit_anyway():
    cache = MergeCache(3 * SIZE, wait_for_room_s=0.05)
    pinned = cache.acquire("pinned", adapter)
    cache.get_or_merge("x", adapter)
    with pytest.raises(ResourceExhausted):
        cache.get_or_merge("big", lambda: adapter(rank=6))  # 3 slots; only 1 freeable
    assert "x" in cache and cache.stats().evictions == 0
    with pytest.raises(ResourceExhausted, match="more than the whole merge cache budget"):
        cache.get_or_merge("huge", lambda: adapter(rank=8))
    cache.release(pinned.entry)


def test_use_without_merge_fn_needs_a_cached_key():
    cache = MergeCache(SIZE)
    with pytest.raises(KeyError), cache.use("absent"):
        pass


def test_release_more_than_acquire_is_an_error():
    cache = MergeCache(SIZE)
    entry = cache.acquire("a", adapter).entry
    cache.release(entry)
    with pytest.raises(RuntimeError, match="released more often"):
        cache.release(entry)


def test_clear_keeps_pinned():
    cache = MergeCache(3 * SIZE)
    held = cache.acquire("held", adapter)
    cache.get_or_merge("x", adapter)
    assert cache.clear() == 1
    assert len(cache) == 1 and "held" in cache and cache.used_bytes == SIZE
    cache.release(held.entry)


def test_many_threads_many_keys_keep_the_budget():
    budget = 4 * SIZE
    cache = MergeCache(budget, wait_for_room_s=0.05)
    merges = {}
    lock = threading.Lock()

    def work(i):
        key = f"k{i % 8}"

        def merge():
            with lock:
                merges[key] = merges.get(key, 0) + 1
            return adapter()

        try:
            with cache.use(key, merge) as result:
                assert result.entry.key == key
                assert cache.used_bytes <= budget
        except ResourceExhausted:
            pass  # four pinned entries can fill the cache; that is the documented answer

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(work, range(400)))
    s = cache.stats()
    assert s.used_bytes <= budget and s.pinned == 0
    assert s.used_bytes == sum(SIZE for k in merges if k in cache)
    assert s.hits + s.misses + s.waits == 400
    assert s.misses == sum(merges.values())


def test_split_budget():
    assert split_budget(1000) == (750, 250)
    assert split_budget(1000, 0.5) == (500, 500)


def test_entries_record_spec_hits_last_use_and_holders():
    cache = MergeCache(4 * SIZE)
    before = time.time()
    first = cache.acquire("k1", adapter, spec="spec-1")
    cache.get_or_merge("k2", adapter, spec="spec-2")
    listed = {e.key: (e, pins) for e, pins in cache.entries()}
    assert listed["k1"][0].spec == "spec-1" and listed["k1"][1] == 1 and listed["k1"][0].hits == 0
    assert listed["k2"][0].spec == "spec-2" and listed["k2"][1] == 0
    assert [e.key for e, _ in cache.entries()] == ["k2", "k1"]  # most recently used first
    cache.release(first.entry)
    time.sleep(0.01)
    cache.acquire("k1")  # a hit without merge_fn
    cache.get_or_merge("k1", adapter)  # a hit with one
    k1, pins = cache.entries()[0]
    assert k1.key == "k1" and k1.hits == 2 and pins == 1
    assert k1.last_used > listed["k1"][0].last_used >= before
    assert cache.entries()[0][0] is not cache.entries()[0][0]  # snapshots, not the live entries
