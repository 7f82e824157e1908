"""The adapter slot table: which adapter sits in which device slot, with reference counts.

Pure bookkeeping, owned by the scheduler beside the KV block pool; the runner's pool only holds
the slots' weights and writes an adapter into a slot when the scheduler's plan says so. A slot
keeps its adapter after its last request ends, for a later request of the same adapter, until
it is wanted for another (least recently used unreferenced slot first).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

from hotmerge_kernels.layout import FlatAdapter


class SlotTable:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        # Weak references: an idle slot keeps its copy on the device for a later request, but
        # never keeps an unloaded or evicted adapter's own memory alive.
        self._adapter: list[weakref.ref | None] = [None] * num_slots
        self._refs = [0] * num_slots
        self._slot_of: dict[int, int] = {}  # id(adapter) -> slot (the slot holds the adapter)
        self._idle: OrderedDict[int, None] = OrderedDict((s, None) for s in range(num_slots))

    def adapter_in(self, slot: int) -> FlatAdapter | None:
        ref = self._adapter[slot] if slot >= 0 else None
        return None if ref is None else ref()

    def _lookup(self, adapter: FlatAdapter) -> int | None:
        """The slot holding this very adapter (an id of a dead one may have been reused)."""
        slot = self._slot_of.get(id(adapter))
        if slot is not None and self.adapter_in(slot) is not adapter:
            del self._slot_of[id(adapter)]  # stale: that slot now holds another (or nothing)
            return None
        return slot

    def can_take(self, adapter: FlatAdapter) -> bool:
        return self._lookup(adapter) is not None or bool(self._idle)

    def take(self, adapter: FlatAdapter) -> tuple[int, bool]:
        """(slot, whether the adapter must be written into it); raises LookupError when every
        slot is in use."""
        slot = self._lookup(adapter)
        fresh = slot is None
        if fresh:
            if not self._idle:
                raise LookupError("every adapter slot is in use")
            slot, _ = self._idle.popitem(last=False)  # least recently used idle slot
            old = self.adapter_in(slot)
            if old is not None:
                del self._slot_of[id(old)]
            self._adapter[slot] = weakref.ref(adapter)
            self._slot_of[id(adapter)] = slot
        elif self._refs[slot] == 0:
            del self._idle[slot]
        self._refs[slot] += 1
        return slot, fresh

    def release(self, slot: int) -> None:
        self._refs[slot] -= 1
        if self._refs[slot] == 0:
            self._idle[slot] = None

    def forget(self, slot: int) -> None:
        """The slot's contents are invalid (a failed write): never reuse them."""
        adapter = self.adapter_in(slot)
        if adapter is not None:
            del self._slot_of[id(adapter)]
        self._adapter[slot] = None

    @property
    def in_use(self) -> int:
        return sum(1 for r in self._refs if r)
