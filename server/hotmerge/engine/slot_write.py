"""Copying an adapter into an adapter-pool slot (``AdapterPool.write``) in a few torch calls.

This runs on the engine thread between steps, once for each adapter or fresh merge that
admission brings in, and each torch call costs host time there. A 7B Llama's adapter has 224
modules: views and copies made per module took 3.4 ms of host time a write, a stack at a time
0.5 ms (CPU, tensors too small for the copies to count: ``benchmarks/slot_write_cost.py``,
``benchmarks/results/slot_write_cost-cpu-2026-12-07.md``). Adapters whose layers are laid out
alike, one stride apart in the buffer (what ``FlatAdapter.from_tensors`` packs from a PEFT file,
and merges of those), go a module *name* at a time instead: that name's A (or B) in every layer
is one strided view of the buffer, copied into the pool's layers by one ``index_copy_`` (14 for
a 7B Llama). Any other adapter goes a module at a time. The plan depends only on the adapter's
segment table, so the pool keeps one per table.

A stack that holds every layer of the pool, in order (any adapter on all the model's layers),
needs no ``index_copy_``: its source is one strided view (B's already transposed) copied onto
the slot's view, and all such stacks go in one ``_foreach_copy_``. Each torch call on the engine
thread lets go of the GIL, and under serving load the front's thread may hold it for up to a
switch interval before the engine thread gets it back: a write of a 7B adapter made about 50
calls, now about 25 (the source views and B's scalings).

An adapter in the pool's dtype is written without a device allocation: B is copied, then scaled
in place (one rounding, as ``b * scaling`` rounds). On the H100 under serving load some writes
took 30-76 ms of the engine thread, nearly all of it CPU time, about as long as the slowest
steps. torch's sync debug mode found the one call in a write that waits for the device (a
spinning wait, hence CPU time): ``AdapterPool.write`` set the rank entries with
``ranks[slot] = r``, a copy from the host; it fills them on the device now
(``benchmarks/slot_write_cost.py --busy-ms``; the GPU test runs a write in the mode "error").
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from hotmerge_kernels.layout import FlatAdapter, Segment

if TYPE_CHECKING:
    from hotmerge.engine.lora import AdapterPool


@dataclass(frozen=True)
class Stack:
    """One module name's A or B in every layer that has it: the view ``(layers, rows, cols)`` of
    the buffer at ``offset`` with ``stride``; ``layers[i]``: the pool layer of view row i."""

    group: str
    slice: int
    part: str
    offset: int
    size: tuple[int, int, int]
    stride: tuple[int, int, int]
    layers: torch.Tensor  # int64, on the pool's device
    all_layers: bool  # view row i is pool layer i, for every layer of the pool


def plan(pool: AdapterPool, segments: tuple[Segment, ...]) -> list[Stack] | None:
    """The stacks that cover ``segments``, or None when some module name's tensors differ in
    shape or are not one stride apart (then write module by module)."""
    by_name: dict[tuple[str, str, str], list[tuple[int, tuple[int, int], int]]] = {}
    every_layer = list(range(next(iter(pool.a.values())).shape[0]))
    for seg in segments:
        group, name, layer = pool.module_paths[seg.module]
        by_name.setdefault((group, name, seg.part), []).append((seg.offset, seg.shape, layer))
    stacks = []
    for (group, name, part), found in by_name.items():
        found.sort()  # buffer order
        steps = {b[0] - a[0] for a, b in itertools.pairwise(found)}
        if len({shape for _, shape, _ in found}) != 1 or len(steps) > 1:
            return None
        rows, cols = found[0][1]
        in_order = [layer for _, _, layer in found]
        layers = _to_device(in_order, pool.device)
        size = (len(found), rows, cols)
        stride = (steps.pop() if steps else rows * cols, cols, 1)
        stacks.append(Stack(
            group, pool.slice_of[name], part, found[0][0], size, stride, layers,
            all_layers=in_order == every_layer,
        ))  # fmt: skip
    return stacks


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """An int64 tensor on ``device`` without waiting for the device: a plan is made on the
    engine thread while a step runs, and ``torch.tensor(..., device=)`` blocks until it ends."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def write_stacks(pool: AdapterPool, slot: int, adapter: FlatAdapter, stacks: list[Stack]):
    """Copy the adapter into ``slot`` a stack at a time; returns the rank per group."""
    ranks = dict.fromkeys(pool.a, 0)
    base = adapter.buffer.storage_offset()  # the buffer may be a view into a larger one
    same_dtype = adapter.dtype == pool.dtype
    dst, src, dst_b = [], [], []  # whole-pool stacks: one multi-tensor copy, then B's scaling
    for st in stacks:
        layers, rows, cols = st.size
        if st.part == "A":  # (layers, r, in)
            r = rows
            out = pool.a[st.group][:, slot, st.slice, :r]
            view = adapter.buffer.as_strided(st.size, st.stride, base + st.offset)
            if st.all_layers:
                dst.append(out)
                src.append(view)
            else:
                out.index_copy_(0, st.layers, view.to(pool.dtype))
            ranks[st.group] = max(ranks[st.group], r)
            continue
        # B: (layers, out, r); the pool stores it transposed, times the scaling
        r = cols
        lo, hi = pool.offsets[st.group][st.slice], pool.offsets[st.group][st.slice + 1]
        out = pool.b[st.group][:, slot, :r, lo:hi]  # layers not in the stack: zeroed
        view = adapter.buffer.as_strided((layers, r, rows), (st.stride[0], 1, r), base + st.offset)
        if not same_dtype:
            out.index_copy_(0, st.layers, _scaled(view, adapter.scaling, pool.dtype))
        elif st.all_layers:
            dst.append(out)
            src.append(view)
            dst_b.append(out)
        else:
            out.index_copy_(0, st.layers, view)
            out.mul_(adapter.scaling)
    if dst:
        torch._foreach_copy_(dst, src)
    for out in dst_b:  # not ``_foreach_mul_``: on the CPU it rounds the scaling to the dtype first
        out.mul_(adapter.scaling)
    return ranks


def write_modules(pool: AdapterPool, slot: int, adapter: FlatAdapter) -> dict[str, int]:
    """Copy the adapter into ``slot`` a module at a time (a few multi-tensor ops over views made
    per module); returns the rank per group."""
    ranks = dict.fromkeys(pool.a, 0)
    dst_a, src_a, dst_b, src_b = [], [], [], []
    for module in adapter.modules:
        group, name, layer = pool.module_paths[module]
        a = adapter.tensor(module, "A")  # (r, in)
        r = a.shape[0]
        s = pool.slice_of[name]
        lo, hi = pool.offsets[group][s], pool.offsets[group][s + 1]
        dst_a.append(pool.a[group][layer, slot, s, :r])
        src_a.append(a)
        dst_b.append(pool.b[group][layer, slot, :r, lo:hi])
        src_b.append(adapter.tensor(module, "B").T)  # (r, out), as the pool stores B
        ranks[group] = max(ranks[group], r)
    if dst_a:
        torch._foreach_copy_(dst_a, src_a)
        if adapter.dtype == pool.dtype:  # in place (no allocation); float32 inside, one rounding
            torch._foreach_copy_(dst_b, src_b)
            torch._foreach_mul_(dst_b, adapter.scaling)
        else:
            torch._foreach_copy_(dst_b, [b.float() * adapter.scaling for b in src_b])
    return ranks


def _scaled(b: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """B (of another dtype than the pool's) times the scaling in float32, rounded once into
    the pool's dtype."""
    return (b.float() * scaling).to(dtype)
