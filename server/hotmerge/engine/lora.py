"""The adapter pool: stacked device slots per projection group, and the per-batch LoRA call.

vLLM's shape: each projection group of each layer holds every slot's A and B stacked
(``a[group]: (layers, slots, slices, max_rank, in)``, ``b[group]: (layers, slots, max_rank, out)``:
B transposed, so the kernels read only the ranks in use, and with the LoRA scaling folded in),
and a batch only says which slot each token uses (-1: none).
Changing adapters or rows then changes numbers in a fixed buffer, never a captured graph.
Fused groups: q/k/v (3 slices of one output), gate/up (2), o and down (1 each).

A named or merged adapter (a FlatAdapter) is copied into a slot when the scheduler's slot
table (``engine/slots.py``) says so: when a request first needs it, into the least recently
used unreferenced slot. Ranks up to ``max_rank`` fit; a slot's columns past its rank are
zeros, and each group records the rank each slot really uses there (0 when the adapter has no
module in the group) so the kernels read nothing more.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from hotmerge_kernels.layout import FlatAdapter
from hotmerge_kernels.lru import LockedLRU
from hotmerge_kernels.ops.lora import (
    DECODE_MAX_TOKENS,
    LoraKernelMeta,
    lora_splits,
    lora_workspace,
)

from hotmerge import request_rules as rules
from hotmerge.engine import ops, slot_write

log = logging.getLogger(__name__)


class AdapterPool:
    """The slots' device storage for our own forward; which adapter goes where is the
    scheduler's (its slot table), and :meth:`write` carries it out."""

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
        self.num_slots = num_slots
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
        self.device = torch.device(device)
        self._plans = LockedLRU(64)  # segment table -> slot_write's plan (few tables in use)
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

    @torch.inference_mode()
    def write(self, slot: int, adapter: FlatAdapter) -> None:
        """Copy ``adapter`` into ``slot`` (``slot_write``: a stack of layers at a time where
        the adapter's layout allows, else a module at a time)."""
        if adapter.ready_event is not None:  # written on another stream (a merge's)
            torch.cuda.current_stream(adapter.device).wait_event(adapter.ready_event)
        rank_views = [r[slot : slot + 1] for r in self.ranks.values()]
        torch._foreach_zero_(
            [t[:, slot] for t in (*self.a.values(), *self.b.values())] + rank_views
        )
        stacks = self._plans.get(adapter.segments, lambda: slot_write.plan(self, adapter.segments))
        if stacks is None:
            ranks = slot_write.write_modules(self, slot, adapter)
        else:
            ranks = slot_write.write_stacks(self, slot, adapter, stacks)
        # Added to the zeroed entries on the device: ``ranks[slot] = r`` would copy r from the
        # host and wait for the device.
        torch._foreach_add_(rank_views, [ranks[group] for group in self.ranks])
        if adapter.buffer.is_cuda:  # its memory is not reused before these copies have run
            adapter.buffer.record_stream(torch.cuda.current_stream(adapter.device))


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
