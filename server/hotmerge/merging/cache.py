"""The merge cache: merged adapters on the device, by cache key, up to a byte budget.

One merge per key however many requests ask at once (single flight): the first asker runs
``merge_fn``, the others wait for its result. Each lookup ends one of three ways, counted apart:

- **hit**: the merged adapter was ready; ``merge_ms`` is 0.
- **miss**: this caller ran the merge; ``merge_ms`` is how long ``merge_fn`` took. The number of
  misses is the number of merges run.
- **wait**: a merge of this key was already running and this caller waited for it; ``hit`` is
  False (the request did not find it ready) and ``merge_ms`` is the time it waited.

A merge that raises is not cached; the error goes to the caller that ran it and to every
waiter, and the next lookup of that key merges again.

Entries are evicted least recently used first, by bytes (``FlatAdapter.nbytes``). An entry in
use is pinned and never evicted: ``use(key, merge_fn)`` (or ``acquire``/``release``) looks up or
merges and pins in one step, so a running request keeps its merged adapter. When the new entry
does not fit even after evicting every unpinned one, nothing is evicted and the merge waits for a
running request to unpin one: under a small budget requests queue rather than fail. Every wait
(for room, for another request's merge of the same key) ends by the request's ``deadline``
(DeadlineExceeded) and by ``wait_for_room_s`` (ResourceExhausted); an entry larger than the
whole budget fails at once. Pinning, eviction, single flight and the waits are
``pinned_lru.PinnedLRU``, shared with the adapter store. The budget counts cached entries only:
while ``merge_fn`` runs (and while its result waits for room), its output is on the device
uncounted.

Sharing the device with the adapter store: each takes its own byte budget from the memory left
for LoRA after the model and the KV cache. A merge of k adapters needs its k inputs resident in
the store while it runs, and a merged adapter is the size of one input (``cat``: the sum), so the
store needs the larger part; ``split_budget`` suggests three quarters for the store and one
quarter for the merge cache.

Observers: ``on_event(event)`` is called, outside the lock, with ``"hit"``, ``"miss"``,
``"wait"``, ``"evict"`` or ``"failure"``; ``stats()`` gives the counters and bytes at any time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from hotmerge_kernels.layout import FlatAdapter

from hotmerge.adapters.pinned_lru import PinnedLRU

log = logging.getLogger(__name__)

MERGE_SHARE = 0.25  # suggested fraction of the LoRA device budget for merged adapters


def split_budget(lora_bytes: int, merge_share: float = MERGE_SHARE) -> tuple[int, int]:
    """Split a device byte budget for LoRA into (adapter store bytes, merge cache bytes)."""
    merge_bytes = int(lora_bytes * merge_share)
    return lora_bytes - merge_bytes, merge_bytes


@dataclass(eq=False)
class MergeEntry:
    key: str
    adapter: FlatAdapter
    nbytes: int
    merge_ms: float  # how long the merge that made it took
    spec: object = None  # what was merged (the caller's; for listing)
    hits: int = 0  # lookups that found it ready
    last_used: float = field(default_factory=time.time)  # seconds since the epoch


class CacheLookup(NamedTuple):
    entry: MergeEntry
    hit: bool
    merge_ms: float  # 0 on a hit; merge time on a miss; time waited on a wait


@dataclass(frozen=True)
class MergeCacheStats:
    hits: int
    misses: int
    waits: int
    failures: int
    evictions: int
    entries: int
    pinned: int
    used_bytes: int
    budget_bytes: int


class MergeCache:
    """Merged adapters by cache key, LRU by bytes, single flight, pinning by reference count."""

    def __init__(
        self,
        budget_bytes: int,
        *,
        on_event: Callable[[str], None] | None = None,
        wait_for_room_s: float = 30.0,
    ):
        self._lru: PinnedLRU[MergeEntry] = PinnedLRU(
            budget_bytes,
            what="merged adapter",
            budget_name="merge cache budget (--merge-budget-mib)",
            max_wait_s=wait_for_room_s,
            on_event=on_event,
        )

    @property
    def budget_bytes(self) -> int:
        return self._lru.budget_bytes

    @property
    def wait_for_room_s(self) -> float:
        return self._lru.max_wait_s

    # -- lookups ---------------------------------------------------------------------------

    def get_or_merge(
        self,
        key: str,
        merge_fn: Callable[[], FlatAdapter],
        *,
        deadline: float | None = None,
        spec: object = None,
    ) -> CacheLookup:
        """The merged adapter of ``key``, merging it with ``merge_fn`` if absent (not pinned)."""
        return self._lookup(key, merge_fn, pin=False, deadline=deadline, spec=spec)

    def acquire(
        self,
        key: str,
        merge_fn: Callable[[], FlatAdapter] | None = None,
        *,
        deadline: float | None = None,
        spec: object = None,
    ) -> CacheLookup:
        """Like ``get_or_merge`` but pins the entry; ``release`` it when done.

        Without ``merge_fn`` the key must be cached (``KeyError`` otherwise). ``spec`` is kept
        with a new entry, for ``entries()``.
        """
        return self._lookup(key, merge_fn, pin=True, deadline=deadline, spec=spec)

    def release(self, entry: MergeEntry) -> None:
        self._lru.release(entry.key)

    @contextmanager
    def use(
        self, key: str, merge_fn: Callable[[], FlatAdapter] | None = None
    ) -> Iterator[CacheLookup]:
        """``with cache.use(key, merge_fn) as (entry, hit, merge_ms):`` pinned inside the block."""
        result = self.acquire(key, merge_fn)
        try:
            yield result
        finally:
            self.release(result.entry)

    # -- inspection and upkeep -------------------------------------------------------------

    def __contains__(self, key: str) -> bool:
        return key in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def pins(self, key: str) -> int:
        """How many running requests hold the entry of ``key`` (0 if absent)."""
        return self._lru.pins(key)

    @property
    def used_bytes(self) -> int:
        return self._lru.used_bytes

    def stats(self) -> MergeCacheStats:
        c = self._lru.counts
        return MergeCacheStats(
            hits=c["hit"],
            misses=c["miss"],
            waits=c["wait"],
            failures=c["failure"],
            evictions=c["evict"],
            entries=len(self._lru),
            pinned=self._lru.pinned_count(),
            used_bytes=self._lru.used_bytes,
            budget_bytes=self._lru.budget_bytes,
        )

    def entries(self) -> list[tuple[MergeEntry, int]]:
        """Snapshots of the cached entries with their pin counts, most recently used first."""
        snapshot = [(replace(e), self._lru.pins(k)) for k, e in self._lru.items()]
        return sorted(snapshot, key=lambda item: item[0].last_used, reverse=True)

    def clear(self) -> int:
        """Evict every unpinned entry; returns how many were evicted."""
        return self._lru.clear()

    # -- internals -------------------------------------------------------------------------

    def _lookup(
        self, key, merge_fn, *, pin: bool, deadline: float | None, spec: object = None
    ) -> CacheLookup:
        make = None
        if merge_fn is not None:

            def make() -> tuple[MergeEntry, int]:
                start = time.perf_counter()
                adapter = merge_fn()
                entry = MergeEntry(key, adapter, adapter.nbytes, _ms_since(start), spec)
                return entry, entry.nbytes

        entry, event, ms = self._lru.acquire(key, make, pin=pin, deadline=deadline)
        entry.last_used = time.time()
        if event == "hit":
            entry.hits += 1
            return CacheLookup(entry, True, 0.0)
        return CacheLookup(entry, False, entry.merge_ms if event == "miss" else ms)


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
