"""Triton kernels of the merge engine; ``reference`` holds their torch twins.

- ``segment_thresholds``: the trim thresholds (``thresholds``), re-exported here so this
  module offers what ``reference`` offers.
- ``_merge_kernel``: per element across N inputs, trim or DARE, then weighted sum or TIES
  (sign election and disjoint mean), float32 inside, written once in the output dtype.
- ``_cat_kernel``: the rank concatenation, each input tensor copied (scaled) to its block of
  rows (A) or columns (B) of the output.
- ``_pair_stats_kernel``: per tensor dot products of two inputs, for slerp.

Inputs are passed as a table of buffer addresses, so one launch covers all adapters however many.
``elementwise_merge`` keeps each launch (arguments and device table) by what fixes it, so a
repeated merge skips rebuilding them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hotmerge_kernels.lru import LockedLRU
from hotmerge_kernels.merge.plan import MergePlan

# MODE_* and ELECT_* number the kernels' MODE and ELECT constexprs
from hotmerge_kernels.merge.reference import (
    DARE_DRAWS,
    MODE_DARE,
    MODE_TRIM,
    PHILOX_M0,
    PHILOX_M1,
    PHILOX_ROUNDS,
    PHILOX_W0,
    PHILOX_W1,
    dare_threshold,
)
from hotmerge_kernels.merge.tables import TABLE_CACHE_SIZE, address_table, load_input, to_device
from hotmerge_kernels.merge.thresholds import segment_thresholds

__all__ = ["cat_merge", "elementwise_merge", "pair_stats", "segment_thresholds"]

MERGE_BLOCK = 1024  # H100, N = 3: 0.183 ms TIES vs 0.207 at 2048 (benchmarks/NOTES-merge.md)
MERGE_WARPS = 4
CAT_BLOCK = 2048

_M0: tl.constexpr = tl.constexpr(PHILOX_M0)
_M1: tl.constexpr = tl.constexpr(PHILOX_M1)
_W0: tl.constexpr = tl.constexpr(PHILOX_W0)
_W1: tl.constexpr = tl.constexpr(PHILOX_W1)
_ROUNDS: tl.constexpr = tl.constexpr(PHILOX_ROUNDS)


@triton.jit
def _dare_keep(seed_lo, seed_hi, adapter, segment, start, keep_below, BLOCK: tl.constexpr):
    """``reference.dare_keep`` for elements start .. start + BLOCK (start % 8 == 0): one Philox
    call per 8 elements, each taking a 16-bit half of an output word, compared as integers."""
    c0 = (start // 8 + tl.arange(0, BLOCK // 8)).to(tl.uint32)
    c1 = tl.zeros([BLOCK // 8], dtype=tl.uint32) + segment.to(tl.uint32)
    c2 = tl.zeros([BLOCK // 8], dtype=tl.uint32) + tl.cast(adapter, tl.uint32)
    c3 = tl.zeros([BLOCK // 8], dtype=tl.uint32)
    k0 = seed_lo.to(tl.uint32, bitcast=True)  # the seed's words, passed as int32 bits
    k1 = seed_hi.to(tl.uint32, bitcast=True)
    for _ in tl.static_range(_ROUNDS):
        p0 = c0
        p2 = c2
        c0 = tl.umulhi(p2, _M1) ^ c1 ^ k0
        c2 = tl.umulhi(p0, _M0) ^ c3 ^ k1
        c1 = p2 * _M1
        c3 = p0 * _M0
        k0 = k0 + _W0
        k1 = k1 + _W1
    words = tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), [BLOCK // 2])  # c0 c1 c2 c3
    draws = tl.reshape(tl.join(words & 0xFFFF, words >> 16), [BLOCK])  # each word: low, high
    return draws.to(tl.int32) < keep_below


@triton.jit
def _transformed_input(
    x_ptrs, thr_ptrs, out_ptr, in_off, in_seg, j, i, N, start, idx, n, keep_below, divisor,
    seed_lo, seed_hi, MODE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """Input i of output tensor j, trimmed or DARE'd, float32 (zeros where absent)."""
    off = tl.load(in_off + j * N + i)
    limit = tl.where(off >= 0, n, 0)
    off = tl.maximum(off, 0)
    ptrs = load_input(x_ptrs, i, out_ptr) + off + idx
    if ALIGNED:  # on the pointers: Triton 3.6 drops a hint on the pointer cast from the table
        ptrs = tl.multiple_of(ptrs, 16)  # each run of 16 starts 16-byte aligned
    x = tl.load(ptrs, mask=idx < limit, other=0).to(tl.float32)
    if MODE == 1:
        seg = tl.maximum(tl.load(in_seg + j * N + i), 0)
        thr = tl.load(tl.load(thr_ptrs + i).to(tl.pointer_type(tl.float32)) + seg)
        x = tl.where(tl.abs(x) >= thr, x, 0.0)
    elif MODE == 2:
        seg = tl.load(in_seg + j * N + i)
        keep = _dare_keep(seed_lo, seed_hi, i, seg, start, keep_below, BLOCK)
        x = tl.where(keep, x / divisor, 0.0)
    return x


@triton.jit
def _vote(vote, x, ELECT: tl.constexpr):
    """The sign vote plus input x: x itself (ELECT 1, total) or its sign (2, frequency)."""
    if ELECT == 1:
        vote += x
    else:
        vote += (x > 0).to(tl.float32) - (x < 0).to(tl.float32)
    return vote


@triton.jit
def _disjoint(acc, count, x, positive, w):
    """TIES's disjoint sum: x (weight w) joins where its sign is the elected one."""
    keep = tl.where(positive, x > 0, x < 0)
    acc += tl.where(keep, x * w, 0.0)
    count += keep.to(tl.float32)
    return acc, count


# Per-request integers are not specialized on (Triton compiles a variant per value that is 1
# or a multiple of 16, and per int32 / int64 type: the seed's words are passed as int32 bits):
# a fresh merge never meets a compile.
@triton.jit(do_not_specialize=["keep_below", "seed_lo", "seed_hi"])
def _merge_kernel(
    out_ptr, x_ptrs, thr_ptrs, w_ptr, chunk_seg, chunk_start, seg_out_off, seg_numel, seg_is_b,
    in_off, in_seg, keep_below, divisor, seed_lo, seed_hi, N: tl.constexpr,
    PER_SEGMENT: tl.constexpr, MODE: tl.constexpr, ELECT: tl.constexpr, BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):  # fmt: skip
    """ALIGNED: every buffer address, tensor offset and numel is a multiple of 16 (the host
    checked), so loads and stores can be 16 bytes wide."""
    c = tl.program_id(0)
    j = tl.load(chunk_seg + c)
    start = tl.load(chunk_start + c)
    n = tl.load(seg_numel + j)
    out_off = tl.load(seg_out_off + j)
    if ALIGNED:
        start = tl.multiple_of(start, 16)
        n = tl.multiple_of(n, 16)
        out_off = tl.multiple_of(out_off, 16)
    w_row = j if PER_SEGMENT else tl.load(seg_is_b + j)
    idx = start + tl.arange(0, BLOCK)
    inb = idx < n
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if ELECT == 0:
        for i in tl.static_range(N):
            x = _transformed_input(
                x_ptrs, thr_ptrs, out_ptr, in_off, in_seg, j, i, N, start, idx, n,
                keep_below, divisor, seed_lo, seed_hi, MODE, BLOCK, ALIGNED,
            )  # fmt: skip
            acc += x * tl.load(w_ptr + w_row * N + i)
    elif N <= 4:  # the N inputs stay in registers from the vote to the disjoint sum
        x0 = _transformed_input(
            x_ptrs, thr_ptrs, out_ptr, in_off, in_seg, j, 0, N, start, idx, n,
            keep_below, divisor, seed_lo, seed_hi, MODE, BLOCK, ALIGNED,
        )  # fmt: skip
        vote = _vote(tl.zeros([BLOCK], dtype=tl.float32), x0, ELECT)
        if N > 1:
            x1 = _transformed_input(
                x_ptrs, thr_ptrs, out_ptr, in_off, in_seg, j, 1, N, start, idx, n,
                keep_below, divisor, seed_lo, seed_hi, MODE, BLOCK, ALIGNED,
            )  # fmt: skip
            vote = _vote(vote, x1, ELECT)
        if N > 2:
            x2 = _transformed_input(
                x_ptrs, thr_ptrs, out_ptr, in_off, in_seg, j, 2, N, start, idx, n,
                keep_below, divisor, seed_lo, seed_hi, MODE, BLOCK, ALIGNED,
            )  # fmt: skip
            vote = _vote(vote, x2, ELECT)
        if N > 3:
            x3 = _transformed_input(
                x_ptrs, thr_ptrs, out_ptr, in_off, in_seg, j, 3, N, start, idx, n,
                keep_below, divisor, seed_lo, seed_hi, MODE, BLOCK, ALIGNED,
            )  # fmt: skip
            vote = _vote(vote, x3, ELECT)
        positive = vote >= 0
        w = w_ptr + w_row * N
        count = tl.zeros([BLOCK], dtype=tl.float32)
        acc, count = _disjoint(acc, count, x0, positive, tl.load(w))
        if N > 1:
            acc, count = _disjoint(acc, count, x1, positive, tl.load(w + 1))
        if N > 2:
            acc, count = _disjoint(acc, count, x2, positive, tl.load(w + 2))
        if N > 3:
            acc, count = _disjoint(acc, count, x3, positive, tl.load(w + 3))
        acc = acc / tl.maximum(count, 1.0)
    else:  # pass 2 reloads the inputs (from L2)
        vote = tl.zeros([BLOCK], dtype=tl.float32)
        nonzero = tl.zeros([BLOCK], dtype=tl.int32)  # bit i: input i survived trim / DARE
        for i in tl.static_range(N):
            x = _transformed_input(
                x_ptrs, thr_ptrs, out_ptr, in_off, in_seg, j, i, N, start, idx, n,
                keep_below, divisor, seed_lo, seed_hi, MODE, BLOCK, ALIGNED,
            )  # fmt: skip
            if N <= 32:
                nonzero = nonzero | ((x != 0).to(tl.int32) << i)
            vote = _vote(vote, x, ELECT)
        positive = vote >= 0
        count = tl.zeros([BLOCK], dtype=tl.float32)
        for i in tl.static_range(N):
            if N <= 32:  # reload (from L2) and reuse the pass-1 mask instead of recomputing
                x = _transformed_input(
                    x_ptrs, thr_ptrs, out_ptr, in_off, in_seg, j, i, N, start, idx, n,
                    keep_below, divisor, seed_lo, seed_hi, 0, BLOCK, ALIGNED,
                )  # fmt: skip
                if MODE == 2:
                    x = x / divisor
                x = tl.where(((nonzero >> i) & 1) != 0, x, 0.0)
            else:
                x = _transformed_input(
                    x_ptrs, thr_ptrs, out_ptr, in_off, in_seg, j, i, N, start, idx, n,
                    keep_below, divisor, seed_lo, seed_hi, MODE, BLOCK, ALIGNED,
                )  # fmt: skip
            acc, count = _disjoint(acc, count, x, positive, tl.load(w_ptr + w_row * N + i))
        acc = acc / tl.maximum(count, 1.0)
    out = out_ptr + out_off + idx
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=inb)


def elementwise_merge(
    out: torch.Tensor,
    plan: MergePlan,
    buffers: list[torch.Tensor],
    weights: torch.Tensor,
    *,
    per_segment: bool,
    thresholds: list[torch.Tensor] | None,
    mode: int,
    elect: int,
    density: float,
    seed: int,
    block: int = MERGE_BLOCK,
    num_warps: int = MERGE_WARPS,
) -> None:
    """See ``reference.elementwise_merge``."""
    if mode == MODE_DARE and block % DARE_DRAWS:
        raise ValueError(f"DARE: block must be a multiple of {DARE_DRAWS}, got {block}")
    n = len(buffers)
    tables = tuple(t.data_ptr() for t in buffers)
    tables += tuple(t.data_ptr() for t in thresholds) if mode == MODE_TRIM else (0,) * n
    # Host weights are keyed by value (they ride in the launch's device table), device ones
    # by the tensor (the kernel reads them at launch).
    w_key = tuple(weights.flatten().tolist()) if weights.device.type == "cpu" else weights
    # A launch is fixed by this key: a repeated merge looks it up instead of rebuilding its
    # arguments and tables; new weights or buffers build a new one (one table upload).
    key = (
        plan, tables, w_key, out.data_ptr() % 16, per_segment, mode, elect, float(density),
        seed, block, num_warps,
    )  # fmt: skip
    launch = _MERGE_LAUNCHES.get(
        key,
        lambda: _merge_launch(
            out, plan, tables, weights, per_segment, mode, elect, density, seed, block, num_warps
        ),
    )
    if launch is not None:
        grid, args, consts = launch
        _merge_kernel[grid](out, *args, **consts)


def _merge_launch(
    out, plan, tables, weights, per_segment, mode, elect, density, seed, block, num_warps
):  # fmt: skip
    """(grid, arguments after the output, constexprs) of one merge launch; None: nothing to do.
    The address table (and host weights) ride in one int64 table kept on the device: it holds
    only values in the launch's key, so reusing it is exact whatever the tensors are now."""
    chunk_seg, chunk_start = plan.chunks(block)
    if len(chunk_seg) == 0:
        return None
    n = len(tables) // 2
    if weights.device.type == "cpu":
        flat = weights.flatten()
        packed = torch.empty(2 * n + (flat.numel() + 1) // 2, dtype=torch.int64)
        packed[: 2 * n] = torch.tensor(tables)
        packed[2 * n :].view(torch.float32)[: flat.numel()] = flat
        packed = to_device(packed, out.device)
        weights = packed[2 * n :].view(torch.float32)
    else:
        packed = to_device(torch.tensor(tables), out.device)
    x_ptrs, thr_ptrs = packed[:n], packed[n : 2 * n]
    aligned = plan.aligned and block % 16 == 0
    aligned = aligned and all(p % 16 == 0 for p in (out.data_ptr(), *tables[:n]))
    # DARE divides the survivors by density; at density 0 none survives (no draw is below 0), so
    # divide by 1 there rather than compute x / 0 for the dropped ones.
    divisor = float(density) if density > 0 else 1.0
    args = (
        x_ptrs, thr_ptrs, weights, chunk_seg, chunk_start, plan.seg_out_off, plan.seg_numel,
        plan.seg_is_b, plan.in_off, plan.in_seg, dare_threshold(density), divisor,
        _int32_bits(seed & 0xFFFFFFFF), _int32_bits(seed >> 32 & 0xFFFFFFFF),
    )  # fmt: skip
    consts = dict(
        N=n, PER_SEGMENT=per_segment, MODE=mode, ELECT=elect, BLOCK=block, ALIGNED=aligned,
        num_warps=num_warps,
    )  # fmt: skip
    return (len(chunk_seg),), args, consts


def _int32_bits(word: int) -> int:
    """A 32-bit word as the int32 with its bits (always an int32 argument to Triton)."""
    return word - (1 << 32) if word >= 1 << 31 else word


# Launches of elementwise_merge (with their device tables), by what fixes them.
_MERGE_LAUNCHES: LockedLRU[tuple | None] = LockedLRU(TABLE_CACHE_SIZE)


@triton.jit
def _cat_kernel(
    out_ptr, x_ptrs, w1_ptr, w2_ptr, copies, C, chunk_copy, chunk_start, N,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """One chunk of one input tensor, scaled, to its rows (A) or columns (B) of the output."""
    c = tl.program_id(0)
    t = tl.load(chunk_copy + c)
    e = tl.load(chunk_start + c) + tl.arange(0, BLOCK)
    i = tl.load(copies + t)
    inb = e < tl.load(copies + 2 * C + t)
    width = tl.load(copies + 4 * C + t).to(tl.int32)
    is_b = tl.load(copies + 6 * C + t)
    base = load_input(x_ptrs, i, out_ptr)
    x = tl.load(base + tl.load(copies + C + t) + e, mask=inb, other=0).to(tl.float32)
    x = x * tl.load(w1_ptr + is_b * N + i) * tl.load(w2_ptr + is_b * N + i)
    dst = tl.load(copies + 3 * C + t) + (e // width).to(tl.int64) * tl.load(copies + 5 * C + t)
    tl.store(out_ptr + dst + e % width, x.to(out_ptr.dtype.element_ty), mask=inb)


def cat_merge(out, plan, buffers, w1, w2, block: int = CAT_BLOCK) -> None:
    """See ``reference.cat_merge``; here one program per chunk of each input tensor."""
    if plan.has_gaps:
        out.zero_()
    chunk_copy, chunk_start = plan.chunks(block, copies=True)
    if len(chunk_copy) == 0:
        return
    w = to_device(torch.stack([w1, w2]), out.device)
    _cat_kernel[(len(chunk_copy),)](
        out, address_table(buffers, out.device), w[0], w[1], plan.copies, plan.copies.shape[1],
        chunk_copy, chunk_start, len(buffers), BLOCK=block, num_warps=4,
    )  # fmt: skip


@triton.jit
def _pair_stats_kernel(stats_ptr, x_ptrs, ref_ptr, seg_numel, in_off, BLOCK: tl.constexpr):
    """Per output tensor: (x0·x1, x0·x0, x1·x1) of its two inputs (absent = 0)."""
    j = tl.program_id(0)
    n = tl.load(seg_numel + j)
    off0 = tl.load(in_off + j * 2)
    off1 = tl.load(in_off + j * 2 + 1)
    base0 = load_input(x_ptrs, 0, ref_ptr)
    base1 = load_input(x_ptrs, 1, ref_ptr)
    n0 = tl.where(off0 >= 0, n, 0)  # an absent input reads as zeros
    n1 = tl.where(off1 >= 0, n, 0)
    dot = tl.zeros([BLOCK], dtype=tl.float32)
    sq0 = tl.zeros([BLOCK], dtype=tl.float32)
    sq1 = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        x0 = tl.load(base0 + off0 + idx, mask=idx < n0, other=0).to(tl.float32)
        x1 = tl.load(base1 + off1 + idx, mask=idx < n1, other=0).to(tl.float32)
        dot += x0 * x1
        sq0 += x0 * x0
        sq1 += x1 * x1
    tl.store(stats_ptr + j * 3, tl.sum(dot, axis=0))
    tl.store(stats_ptr + j * 3 + 1, tl.sum(sq0, axis=0))
    tl.store(stats_ptr + j * 3 + 2, tl.sum(sq1, axis=0))


def pair_stats(plan: MergePlan, buffers: list[torch.Tensor], block: int = 4096) -> torch.Tensor:
    """See ``reference.pair_stats``; one program per output tensor."""
    device = plan.in_off.device
    stats = torch.zeros(len(plan.segments), 3, dtype=torch.float32, device=device)
    if len(plan.segments):
        _pair_stats_kernel[(len(plan.segments),)](
            stats, address_table(buffers, device), buffers[0], plan.seg_numel, plan.in_off,
            BLOCK=block, num_warps=8,
        )  # fmt: skip
    return stats


__all__ = ["cat_merge", "elementwise_merge", "pair_stats", "segment_thresholds"]
