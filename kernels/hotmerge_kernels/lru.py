"""``LockedLRU``: the one cache the kernels keep at module level, safe under concurrent callers.

Plans, launch tables and device address tables are built once and reused across merges, and
merges of different keys run at once on the server's RPC threads. An ``OrderedDict`` driven
from several threads loses entries between a lookup and its ``move_to_end`` (``KeyError``), so
every read and write of the map happens under one lock. ``make()`` runs outside the lock: a
slow build (a plan, a table upload) never makes callers of other keys wait. Two callers that
miss the same key at once may both build it; the first to store wins and both get its value,
so every caller of a key shares one object.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class LockedLRU(Generic[V]):
    """At most ``size`` values by key; the least recently used go first."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self._values: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], V]) -> V:
        """The value of ``key``, made by ``make()`` and kept when absent."""
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
        value = make()
        with self._lock:
            if key in self._values:  # another caller stored it while we built ours
                self._values.move_to_end(key)
                return self._values[key]
            self._values[key] = value
            if len(self._values) > self.size:
                self._values.popitem(last=False)
        return value

    def __len__(self) -> int:
        with self._lock:
            return len(self._values)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
