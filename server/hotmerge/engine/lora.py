"""The adapter pool: stacked device slots per projection group, and the per-batch LoRA call.

vLLM's shape: each projection group of each layer holds every slot's A and B stacked
(``a[group]: (layers, slots, slices, max_rank, in)``, ``b[group]: (layers, slots, max_rank, out)``:
B transposed, so the kernels read only the ranks in use, and with the LoRA scaling folded in),
and a batch only says which slot each token uses (-1: none).
Changing adapters or rows then changes numbers in a fixed buffer, never a captured graph.
Fused groups: q/k/v (3 slices of one output), gate/up (2), o and down (1 each).

A named or merged adapter (a FlatAdapter) is copied into a free slot when a request first
needs it and stays there, reference counted, until the slot is wanted for another adapter
(least recently used unreferenced slot first). Ranks up to ``max_rank`` fit; a slot's columns
past its rank are zeros, and each group records the rank each slot really uses there (0 when
the adapter has no module in the group) so the kernels read nothing more.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from hotmerge_kernels.layout import FlatAdapter
from hotmerge_kernels.ops.lora import (
    DECODE_MAX_TOKENS,
    LoraKernelMeta,
    lora_splits,
    lora_workspace,
)

from hotmerge import request_rules as rules
from hotmerge.engine import ops

log = logging.getLogger(__name__)


class SlotTable:
    """Which adapter sits in which slot, with reference counts; pure bookkeeping."""

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

    def check(self, adapter: FlatAdapter) -> str | None:
        """Why ``adapter`` cannot go into a slot (None: it can)."""
        return None

    def can_take(self, adapter: FlatAdapter) -> bool:
        return self._lookup(adapter) is not None or bool(self._idle)

    def take(self, adapter: FlatAdapter) -> tuple[int, bool]:
        """(slot, whether it must be written); raises LookupError when every slot is in use."""
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


class AdapterPool(SlotTable):
    """Slots with device storage for our own forward."""

    def __init__(
        self,
        shapes: dict[str, dict[str, tuple[int, int]]],
        module_paths: dict[str, tuple[str, str, int]],
        *,
        num_layers: int,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__(num_slots)
        self.max_rank = max_rank
        self.dtype = dtype
        self.module_paths = module_paths
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        self.offsets: dict[str, tuple[int, ...]] = {}
        self.slice_of: dict[str, int] = {}  # module name -> its slice in its group
        self.ranks: dict[str, torch.Tensor] = {}
        for group, modules in shapes.items():
            (fan_in,) = {i for i, _ in modules.values()}
            offsets = [0]
            for s, (name, (_, out)) in enumerate(modules.items()):
                offsets.append(offsets[-1] + out)
                self.slice_of[name] = s
            self.offsets[group] = tuple(offsets)
            shape_a = (num_layers, num_slots, len(modules), max_rank, fan_in)
            self.a[group] = torch.zeros(shape_a, dtype=dtype, device=device)
            self.b[group] = torch.zeros(  # rank-major: expand reads only the ranks in use
                (num_layers, num_slots, max_rank, offsets[-1]), dtype=dtype, device=device
            )
            self.ranks[group] = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self.nbytes = sum(
            t.numel() * t.element_size() for t in [*self.a.values(), *self.b.values()]
        )

    def check(self, adapter: FlatAdapter) -> str | None:
        """Why ``adapter`` cannot go into a slot (None: it can)."""
        widest = max((s.shape[0] for s in adapter.segments if s.part == "A"), default=0)
        return rules.rank_problem(widest, self.max_rank)

    @contextmanager
    def every_slot_full(self) -> Iterator[None]:
        """Every slot reads as a full-rank adapter inside the block: the warm-up at start-up
        then runs (and compiles) every kernel's real work, not programs that exit at once."""
        saved = {g: r.clone() for g, r in self.ranks.items()}
        for r in self.ranks.values():
            r.fill_(self.max_rank)
        try:
            yield
        finally:
            for g, r in self.ranks.items():
                r.copy_(saved[g])

    def take(self, adapter: FlatAdapter) -> tuple[int, bool]:
        slot, fresh = super().take(adapter)
        if fresh:
            try:
                self._write(slot, adapter)
            except BaseException:
                self.forget(slot)
                self.release(slot)
                raise
        return slot, fresh

    @torch.inference_mode()
    def _write(self, slot: int, adapter: FlatAdapter) -> None:
        """Copy ``adapter`` into ``slot``: a few multi-tensor ops, not a few per module (this
        runs on the engine thread between steps, where each torch call costs host time)."""
        ranks = dict.fromkeys(self.a, 0)
        torch._foreach_zero_([t[:, slot] for t in (*self.a.values(), *self.b.values())])
        dst_a, src_a, dst_b, src_b = [], [], [], []
        for module in adapter.modules:
            group, name, layer = self.module_paths[module]
            a = adapter.tensor(module, "A")  # (r, in)
            r = a.shape[0]
            s = self.slice_of[name]
            lo, hi = self.offsets[group][s], self.offsets[group][s + 1]
            dst_a.append(self.a[group][layer, slot, s, :r])
            src_a.append(a)
            dst_b.append(self.b[group][layer, slot, :r, lo:hi])
            src_b.append(adapter.tensor(module, "B").T)  # (r, out), as the pool stores B
            ranks[group] = max(ranks[group], r)
        if dst_a:
            torch._foreach_copy_(dst_a, src_a)
            # B times the scaling in float32, rounded once into the pool's dtype.
            if adapter.dtype == self.dtype:  # the multiply computes in float32 for 16 bits
                torch._foreach_copy_(dst_b, torch._foreach_mul(src_b, adapter.scaling))
            else:
                torch._foreach_copy_(dst_b, [b.float() * adapter.scaling for b in src_b])
        for group, r in ranks.items():
            self.ranks[group][slot] = r


class LoraBatch:
    """Which slot each token of one forward uses, and the call each projection group makes.

    ``token_slots`` (T,) int32 on the device, -1 for base-model tokens. On CUDA every group is
    two Triton launches (shrink, expand) into one workspace (``lora_workspace``); decode
    launches index rows directly, longer forwards read the tokens grouped by slot once per
    forward (``LoraKernelMeta``). The torch twins (CPU) multiply each slot's tokens by its
    adapter.
    """

    def __init__(self, pool: AdapterPool, token_slots: torch.Tensor) -> None:
        self.pool = pool
        self.token_slots = token_slots
        tokens = token_slots.shape[0]
        self.kernels = ops.triton_enabled(token_slots)
        self.meta = None
        if self.kernels and tokens > DECODE_MAX_TOKENS:  # from the graph's pool when captured
            self.meta = LoraKernelMeta(tokens, pool.num_slots, token_slots.device)
            self.meta.update(token_slots)
        self.buf = lora_workspace(
            [a.shape[-1] for a in pool.a.values()],
            max(len(o) - 1 for o in pool.offsets.values()),
            tokens,
            pool.max_rank,
            token_slots.device,
        )

    def apply(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor) -> None:
        a = self.pool.a[group][layer]
        b = self.pool.b[group][layer]
        offsets = self.pool.offsets[group]
        buf = self.buf[: lora_splits(x.shape[1], x.shape[0]), : len(offsets) - 1]
        ranks = self.pool.ranks[group]
        ops.lora(x, y, a, b, ranks, self.token_slots, offsets, buf, self.meta)
