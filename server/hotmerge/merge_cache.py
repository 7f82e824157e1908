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
does not fit even after evicting every unpinned one, nothing is evicted and the merge waits (up
to ``wait_for_room_s``) for a running request to unpin one: under a small budget requests queue
rather than fail. It raises ``ResourceExhausted`` when that wait runs out, or at once when the
entry is larger than the whole budget. The budget counts cached entries only: while
``merge_fn`` runs (and while its result waits for room), its output is on the device uncounted.

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
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from hotmerge_kernels.layout import FlatAdapter

from hotmerge.errors import ResourceExhausted

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
    refs: int = 0  # requests using it now; > 0 pins it
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
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        # When every cached entry is pinned, a new merge waits this long for a running request
        # to release one (backpressure) before failing with ResourceExhausted.
        self.wait_for_room_s = wait_for_room_s
        self._on_event = on_event
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # notified when an entry is unpinned
        self._entries: OrderedDict[str, MergeEntry] = OrderedDict()  # least recent first
        self._flights: dict[str, _Flight] = {}
        self._bytes = 0
        self._counts = dict.fromkeys(("hit", "miss", "wait", "failure", "evict"), 0)

    # -- lookups ---------------------------------------------------------------------------

    def get_or_merge(
        self, key: str, merge_fn: Callable[[], FlatAdapter], *, spec: object = None
    ) -> CacheLookup:
        """The merged adapter of ``key``, merging it with ``merge_fn`` if absent (not pinned)."""
        return self._get_or_merge(key, merge_fn, pin=False, spec=spec)

    def acquire(
        self,
        key: str,
        merge_fn: Callable[[], FlatAdapter] | None = None,
        *,
        spec: object = None,
    ) -> CacheLookup:
        """Like ``get_or_merge`` but pins the entry; ``release`` it when done.

        Without ``merge_fn`` the key must be cached (``KeyError`` otherwise). ``spec`` is kept
        with a new entry, for ``entries()``.
        """
        if merge_fn is None:
            with self._lock:
                entry = self._entries[key]
                entry.refs += 1
                self._touch(entry)
                self._counts["hit"] += 1
            self._emit(["hit"])
            return CacheLookup(entry, True, 0.0)
        return self._get_or_merge(key, merge_fn, pin=True, spec=spec)

    def release(self, entry: MergeEntry) -> None:
        with self._lock:
            if entry.refs <= 0:
                raise RuntimeError(f"merged adapter {entry.key} released more often than acquired")
            entry.refs -= 1
            if entry.refs == 0:
                self._room.notify_all()

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
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def stats(self) -> MergeCacheStats:
        with self._lock:
            c = self._counts
            return MergeCacheStats(
                hits=c["hit"],
                misses=c["miss"],
                waits=c["wait"],
                failures=c["failure"],
                evictions=c["evict"],
                entries=len(self._entries),
                pinned=sum(1 for e in self._entries.values() if e.refs > 0),
                used_bytes=self._bytes,
                budget_bytes=self.budget_bytes,
            )

    def entries(self) -> list[MergeEntry]:
        """Snapshots of the cached entries, most recently used first."""
        with self._lock:
            return [replace(e) for e in reversed(self._entries.values())]

    def clear(self) -> int:
        """Evict every unpinned entry; returns how many were evicted."""
        with self._lock:
            victims = [k for k, e in self._entries.items() if e.refs == 0]
            for k in victims:
                self._evict(k)
        self._emit(["evict"] * len(victims))
        return len(victims)

    # -- internals -------------------------------------------------------------------------

    def _get_or_merge(
        self, key: str, merge_fn: Callable[[], FlatAdapter], *, pin: bool, spec: object = None
    ) -> CacheLookup:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._touch(entry)
                entry.refs += pin
                self._counts["hit"] += 1
            else:
                flight = self._flights.get(key)
                leader = flight is None
                if leader:
                    flight = self._flights[key] = _Flight()
                flight.pins += pin  # the leader pins for every waiter that asked to pin
                self._counts["miss" if leader else "wait"] += 1
        if entry is not None:
            self._emit(["hit"])
            return CacheLookup(entry, True, 0.0)

        start = time.perf_counter()
        if not leader:
            self._emit(["wait"])
            entry = flight.future.result()  # raises the leader's error
            return CacheLookup(entry, False, _ms_since(start))

        self._emit(["miss"])
        try:
            adapter = merge_fn()
            merge_ms = _ms_since(start)
            give_up = time.monotonic() + self.wait_for_room_s
            with self._room:
                while (inserted := self._insert(key, adapter, merge_ms, flight.pins, spec)) is None:
                    if not self._room.wait(timeout=give_up - time.monotonic()):
                        raise ResourceExhausted(
                            f"merged adapter {key} needs {adapter.nbytes} bytes but the merge "
                            f"cache's {self.budget_bytes} bytes stayed full of merged adapters "
                            f"in use for {self.wait_for_room_s:.0f} s; retry later, or raise "
                            "the merge cache budget"
                        )
                del self._flights[key]
                entry, evicted = inserted
        except BaseException as exc:
            with self._lock:
                if self._flights.get(key) is flight:  # not yet removed, nor replaced by a retry
                    del self._flights[key]
                self._counts["failure"] += 1
            flight.future.set_exception(exc)
            self._emit(["failure"])
            raise
        flight.future.set_result(entry)
        self._emit(["evict"] * len(evicted))
        return CacheLookup(entry, False, merge_ms)

    def _insert(
        self, key: str, adapter: FlatAdapter, merge_ms: float, refs: int, spec: object = None
    ) -> tuple[MergeEntry, list[str]] | None:
        """Add an entry, evicting LRU unpinned ones to make room (lock held).

        None: it would fit only once a running request unpins an entry.
        """
        nbytes = adapter.nbytes
        if nbytes > self.budget_bytes:
            raise ResourceExhausted(
                f"merged adapter {key} needs {nbytes} bytes, more than the whole merge cache "
                f"budget of {self.budget_bytes} bytes; raise the merge cache budget"
            )
        unpinned = [(k, e.nbytes) for k, e in self._entries.items() if e.refs == 0]
        freeable = sum(n for _, n in unpinned)
        if self._bytes - freeable + nbytes > self.budget_bytes:
            return None
        evicted = []
        for k, _ in unpinned:  # least recently used first
            if self._bytes + nbytes <= self.budget_bytes:
                break
            self._evict(k)
            evicted.append(k)
        entry = MergeEntry(
            key=key, adapter=adapter, nbytes=nbytes, merge_ms=merge_ms, refs=refs, spec=spec
        )
        self._entries[key] = entry
        self._bytes += nbytes
        return entry, evicted

    def _touch(self, entry: MergeEntry) -> None:
        """A hit (lock held): most recently used, counted."""
        self._entries.move_to_end(entry.key)
        entry.hits += 1
        entry.last_used = time.time()

    def _evict(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.nbytes
        self._counts["evict"] += 1
        log.debug("merge cache: evicted %s (%d bytes)", key, entry.nbytes)

    def _emit(self, events: list[str]) -> None:
        if self._on_event is not None:
            for event in events:
                self._on_event(event)


class _Flight:
    """A merge in progress: its waiters block on ``future``."""

    def __init__(self) -> None:
        self.future: Future[MergeEntry] = Future()
        self.pins = 0


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
