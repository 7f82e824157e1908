"""Values by key up to a byte budget: pinning, LRU eviction, single flight, bounded waits.

One implementation for the adapter store (adapters by id) and the merge cache (merged adapters
by cache key):

- **pins**: ``acquire(..., pin=True)`` pins the value until ``release(key)``; a pinned value is
  never evicted nor removed.
- **LRU by bytes**: making room evicts unpinned values, least recently used first, and nothing
  at all when even that would not be enough.
- **single flight**: the first ``acquire`` of an absent key (the leader) runs ``make``; the
  others wait for its value. A leader that fails with a request-side ending (cancelled,
  deadline) passes the job on: a waiter retries and becomes the leader. Any other failure
  reaches every waiter, and the next lookup makes the value again.
- **bounded waits**: every wait (for room, for another request's ``make``) ends at the earlier
  of the request's ``deadline`` (``time.monotonic()``) and ``max_wait_s`` from its start,
  with DeadlineExceeded or ResourceExhausted saying which. A value larger than the whole budget
  fails at once: no wait can make it fit.
- **reservations**: with ``size`` known before ``make`` (an adapter's size comes from its file
  header), room is made *before* ``make`` runs, so nothing is read that could not be kept.

``on_event(event)`` is called outside the lock with ``hit``, ``miss``, ``wait``, ``evict`` or
``failure``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar

from hotmerge.errors import Cancelled, DeadlineExceeded, ResourceExhausted

V = TypeVar("V")
EVENTS = ("hit", "miss", "wait", "evict", "failure")


class Lookup(NamedTuple, Generic[V]):
    value: V
    event: str  # "hit", "miss" (this caller made it) or "wait" (another request made it)
    ms: float  # 0 on a hit; time spent in make on a miss; time waited on a wait


@dataclass(eq=False)
class _Slot(Generic[V]):
    value: V
    nbytes: int
    pins: int = 0


@dataclass(eq=False)
class _Flight:
    """A ``make`` in progress; waiters block on ``done``."""

    pins: int = 0  # pins asked for by the leader and its waiters, given to the value
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    inserted: bool = False


class PinnedLRU(Generic[V]):
    def __init__(
        self,
        budget_bytes: int,
        *,
        what: str,
        budget_name: str,
        max_wait_s: float = 30.0,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        """``what`` names a value in messages ("adapter"); ``budget_name`` the budget and how
        to raise it ("adapter budget (--adapter-budget-mib)")."""
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self.what = what
        self.budget_name = budget_name
        self.max_wait_s = max_wait_s
        self._on_event = on_event
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # notified when bytes may have freed up
        self._slots: OrderedDict[Hashable, _Slot[V]] = OrderedDict()  # least recent first
        self._flights: dict[Hashable, _Flight] = {}
        self._used = 0  # bytes of the values plus room reserved for makes in progress
        self.counts = dict.fromkeys(EVENTS, 0)

    # -- lookups ---------------------------------------------------------------------------

    def acquire(
        self,
        key: Hashable,
        make: Callable[[], tuple[V, int]] | None,
        *,
        pin: bool = True,
        size: int | None = None,
        deadline: float | None = None,
    ) -> Lookup[V]:
        """The value of ``key`` (pinned with ``pin``), made by ``make() -> (value, nbytes)``
        when absent. Without ``make`` an absent key raises KeyError. ``size``: the bytes the
        value will take, when known before ``make``, to reserve room first."""
        started = time.monotonic()
        give_up = started + self.max_wait_s
        while True:
            with self._lock:
                slot = self._slots.get(key)
                if slot is not None:
                    self._slots.move_to_end(key)
                    slot.pins += pin
                    self.counts["hit"] += 1
                    value = slot.value
                    flight = None
                elif make is None:
                    raise KeyError(key)
                else:
                    flight = self._flights.get(key)
                    leader = flight is None
                    if leader:
                        flight = self._flights[key] = _Flight()
                    flight.pins += pin
                    self.counts["miss" if leader else "wait"] += 1
            if flight is None:
                self._emit("hit")
                return Lookup(value, "hit", 0.0)
            if leader:
                return self._lead(key, flight, make, size, deadline, give_up)
            self._emit("wait")
            value = self._follow(key, flight, pin, deadline, give_up)
            if value is not None:
                return Lookup(value[0], "wait", (time.monotonic() - started) * 1000)
            # The leader's request ended before its make did: try again, maybe as the leader.

    def release(self, key: Hashable) -> None:
        with self._lock:
            slot = self._slots.get(key)
            if slot is None or slot.pins <= 0:
                raise RuntimeError(f"{self.what} {key} released more often than acquired")
            slot.pins -= 1
            if slot.pins == 0:
                self._room.notify_all()

    def peek(self, key: Hashable) -> V | None:
        """The value if present now; no pin, no change of recency."""
        with self._lock:
            slot = self._slots.get(key)
            return None if slot is None else slot.value

    def pins(self, key: Hashable) -> int:
        with self._lock:
            slot = self._slots.get(key)
            return 0 if slot is None else slot.pins

    def remove(self, key: Hashable) -> V | None:
        """Drop an unpinned value (None if absent); a pinned one raises ResourceExhausted."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                return None
            if slot.pins:
                raise ResourceExhausted(
                    f"{self.what} {key} is in use by {slot.pins} running request(s); "
                    "try again when they finish"
                )
            self._evict(key)
            return slot.value

    def clear(self) -> int:
        """Evict every unpinned value; returns how many."""
        with self._lock:
            victims = [k for k, s in self._slots.items() if s.pins == 0]
            for k in victims:
                self._evict(k)
        for _ in victims:
            self._emit("evict")
        return len(victims)

    def items(self) -> list[tuple[Hashable, V]]:
        with self._lock:
            return [(k, s.value) for k, s in self._slots.items()]

    def pinned_count(self) -> int:
        with self._lock:
            return sum(1 for s in self._slots.values() if s.pins)

    @property
    def used_bytes(self) -> int:
        return self._used

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._slots

    def __len__(self) -> int:
        with self._lock:
            return len(self._slots)

    # -- internals -------------------------------------------------------------------------

    def _lead(self, key, flight: _Flight, make, size, deadline, give_up) -> Lookup[V]:
        reserved = evicted = 0
        try:
            if size is not None:
                with self._lock:
                    evicted += self._make_room(key, size, deadline, give_up)
                    reserved = size
            self._emit("miss")
            start = time.perf_counter()
            value, nbytes = make()
            made_ms = (time.perf_counter() - start) * 1000
            with self._lock:
                self._used -= reserved
                reserved = 0
                evicted += self._make_room(key, nbytes, deadline, give_up)
                self._slots[key] = _Slot(value, nbytes, flight.pins)
                flight.inserted = True
                del self._flights[key]
        except BaseException as exc:
            with self._lock:
                self._used -= reserved
                if reserved:
                    self._room.notify_all()
                if self._flights.get(key) is flight:
                    del self._flights[key]
                self.counts["failure"] += 1
            flight.error = exc
            flight.done.set()
            for _ in range(evicted):
                self._emit("evict")
            self._emit("failure")
            raise
        flight.done.set()
        for _ in range(evicted):
            self._emit("evict")
        return Lookup(value, "miss", made_ms)

    def _follow(self, key, flight: _Flight, pin: bool, deadline, give_up) -> tuple[V] | None:
        """Wait for the leader: (value,), or None when the leader's request ended first."""
        timeout = _remaining(deadline, give_up)
        if not flight.done.wait(timeout):
            with self._lock:  # give back the pin asked for (the value may have just arrived)
                if flight.inserted and pin and key in self._slots:
                    self._slots[key].pins -= 1
                    self._room.notify_all()
                elif not flight.inserted:
                    flight.pins -= pin
            raise self._timeout_error(
                deadline, give_up, f"waiting for another request to make {self.what} {key}"
            )
        if flight.error is not None:
            if isinstance(flight.error, Cancelled | DeadlineExceeded):
                return None
            raise flight.error
        with self._lock:
            return (self._slots[key].value,) if key in self._slots else None

    def _make_room(self, key, nbytes: int, deadline, give_up) -> int:
        """Evict LRU unpinned values until ``nbytes`` more fit, then count them (lock held);
        waits, bounded, while pinned values hold the room. Returns how many were evicted."""
        if nbytes > self.budget_bytes:
            raise ResourceExhausted(
                f"{self.what} {key} needs {nbytes} bytes, more than the whole {self.budget_name} "
                f"of {self.budget_bytes} bytes; it can never fit: raise the {self.budget_name}"
            )
        while not self._fits(nbytes):
            timeout = _remaining(deadline, give_up)
            if (timeout <= 0 or not self._room.wait(timeout)) and not self._fits(nbytes):
                raise self._timeout_error(
                    deadline,
                    give_up,
                    f"waiting for room for {self.what} {key} ({nbytes} bytes) in the "
                    f"{self.budget_name} of {self.budget_bytes} bytes, held by {self.what}s in use",
                )
        evicted = 0
        for victim in [k for k, s in self._slots.items() if s.pins == 0]:
            if self._used + nbytes <= self.budget_bytes:
                break
            self._evict(victim)
            evicted += 1
        self._used += nbytes
        return evicted

    def _fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit once every unpinned value is evicted (lock held)."""
        freeable = sum(s.nbytes for s in self._slots.values() if s.pins == 0)
        return self._used - freeable + nbytes <= self.budget_bytes

    def _timeout_error(self, deadline, give_up, doing: str) -> Exception:
        if deadline is not None and deadline <= give_up:
            return DeadlineExceeded(f"deadline exceeded {doing}")
        return ResourceExhausted(
            f"gave up after the server maximum of {self.max_wait_s:g} s (--max-wait-s) {doing}; "
            f"retry later, or raise the {self.budget_name} or --max-wait-s"
        )

    def _evict(self, key) -> None:
        slot = self._slots.pop(key)
        self._used -= slot.nbytes
        self.counts["evict"] += 1
        self._room.notify_all()

    def _emit(self, event: str) -> None:
        if self._on_event is not None:
            self._on_event(event)


def _remaining(deadline: float | None, give_up: float) -> float:
    end = give_up if deadline is None else min(deadline, give_up)
    return max(0.0, end - time.monotonic())
