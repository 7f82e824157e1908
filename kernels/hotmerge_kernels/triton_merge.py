"""Triton kernels of the merge engine; ``reference`` holds their torch twins.

- ``_threshold_hist_kernel`` / ``_threshold_select_kernel``: exact k-th largest |x| of every
  tensor of every adapter, by radix select over the magnitude bits of the storage dtype, 8 bits
  a pass (2 passes for bf16/fp16, 4 for fp32): per pass, every chunk of every tensor histograms
  its digit in registers and adds it to its tensor's global histogram, then one program per
  tensor picks the digit.
- ``_merge_kernel``: per element across N inputs, trim or DARE, then weighted sum or TIES
  (sign election and disjoint mean), float32 inside, written once in the output dtype.
- ``_cat_kernel``: the rank concatenation, each input tensor copied (scaled) to its block of
  rows (A) or columns (B) of the output.
- ``_pair_stats_kernel``: per tensor dot products of two inputs, for slerp.

Inputs are passed as a table of buffer addresses, so one launch covers all adapters however many.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from .layout import FlatAdapter
from .plan import MergePlan, layout_signature, lru_get
from .reference import (  # MODE_* and ELECT_* number the kernels' MODE and ELECT constexprs
    MODE_TRIM,
    PHILOX_M0,
    PHILOX_M1,
    PHILOX_ROUNDS,
    PHILOX_W0,
    PHILOX_W1,
    trim_k,
)

_TABLE_CACHE_SIZE = 256  # device copies of address / weight tables kept for reuse
MERGE_BLOCK = 1024  # H100, N = 3: 0.183 ms TIES vs 0.207 at 2048 (benchmarks/NOTES-merge.md)
MERGE_WARPS = 4
CAT_BLOCK = 2048
THRESHOLD_BLOCK = 4096
THRESHOLD_WARPS = 8
# Elements one threshold program histograms before its atomic flush: 7B shapes, N = 3, bf16 give
# ~7.7k programs a pass. Not yet measured on a GPU (issue 11).
THRESHOLD_CHUNK = 16384
# Radix digit bits a pass: 8 (2 passes for bf16/fp16, 4 for fp32). H100, N = 3 rank 16: 8 bits
# 1.05 ms; an 11 + 4 split (2048 bins first) 3.7-4.8 ms; 5 bits (3 passes) as slow as 8 bits.
THRESHOLD_DIGIT_BITS = 8
_HIST_MASK: tl.constexpr = tl.constexpr(
    "mask" in inspect.signature(tl.histogram).parameters
)  # fmt: skip

_M0: tl.constexpr = tl.constexpr(PHILOX_M0)
_M1: tl.constexpr = tl.constexpr(PHILOX_M1)
_W0: tl.constexpr = tl.constexpr(PHILOX_W0)
_W1: tl.constexpr = tl.constexpr(PHILOX_W1)
_ROUNDS: tl.constexpr = tl.constexpr(PHILOX_ROUNDS)


def _to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return table
    return table.pin_memory().to(device, non_blocking=True)


def _address_table(tensors: list[torch.Tensor], device) -> torch.Tensor:
    """int64 table of the tensors' addresses on the device, uploaded once per distinct table."""
    addresses = tuple(t.data_ptr() for t in tensors)
    return lru_get(
        _address_tables,
        (addresses, str(device)),
        lambda: _to_device(torch.tensor(addresses, dtype=torch.int64), device),
        _TABLE_CACHE_SIZE,
    )


_address_tables: OrderedDict[tuple, torch.Tensor] = OrderedDict()


@triton.jit
def _load_input(ptr_table, i, ref_ptr):
    return tl.load(ptr_table + i).to(tl.pointer_type(ref_ptr.dtype.element_ty))


@triton.jit
def _magnitude_key(x, KEY_BITS: tl.constexpr):
    if KEY_BITS == 15:
        key = x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    else:
        key = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return key


@triton.jit
def _threshold_hist_kernel(
    tasks, T, chunk_task, chunk_start, state, hist, x_ptrs, ref_ptr, SHIFT: tl.constexpr,
    WIDTH: tl.constexpr, KEY_BITS: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One radix pass over one CHUNK of one tensor: a WIDTH-bit histogram of (key >> SHIFT)
    over the keys whose bits above SHIFT + WIDTH equal the tensor's prefix so far, summed in
    registers and flushed to the tensor's global histogram with one atomic per non-empty bin.

    Long tensors are split over many programs (the old one-program-per-tensor sweep left most
    of the device idle on 7B shapes: 1.05 ms for 2 x 252 MB on an H100). tl.histogram lowers to
    one shared-memory atomic per element, so keys of other prefixes are masked out of it."""
    BINS: tl.constexpr = 1 << WIDTH
    c = tl.program_id(0)
    t = tl.load(chunk_task + c)
    base = _load_input(x_ptrs, tl.load(tasks + t), ref_ptr) + tl.load(tasks + T + t)
    n = tl.load(tasks + 2 * T + t)
    start = tl.load(chunk_start + c).to(tl.int64)
    prefix = tl.zeros([], dtype=tl.int32)
    if SHIFT + WIDTH < KEY_BITS:
        prefix = tl.load(state + t)
    bins = tl.arange(0, BINS)
    counts = tl.zeros([BINS], dtype=tl.int32)
    for off in tl.static_range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        inb = idx < n
        key = _magnitude_key(tl.load(base + idx, mask=inb, other=0), KEY_BITS)
        valid = inb
        if SHIFT + WIDTH < KEY_BITS:
            valid = valid & ((key >> (SHIFT + WIDTH)) == (prefix >> (SHIFT + WIDTH)))
        digit = (key >> SHIFT) & (BINS - 1)
        if _HIST_MASK:
            counts += tl.histogram(digit, BINS, mask=valid)
        else:
            digit = tl.where(valid, digit, 0)
            n_invalid = BLOCK - tl.sum(valid.to(tl.int32), axis=0)
            counts += tl.histogram(digit, BINS) - tl.where(bins == 0, n_invalid, 0)
    tl.atomic_add(hist + t * BINS + bins, counts, mask=counts > 0, sem="relaxed")


@triton.jit
def _threshold_select_kernel(
    tasks, T, state, hist, thr_out, ref_ptr, SHIFT: tl.constexpr, WIDTH: tl.constexpr,
    KEY_BITS: tl.constexpr, LAST: tl.constexpr,
):  # fmt: skip
    """Per tensor, after a pass: the digit holding the remaining-th largest key among those
    matching the prefix; state = (prefix, remaining rank). After the last pass, the threshold
    (inf when k = 0)."""
    BINS: tl.constexpr = 1 << WIDTH
    t = tl.program_id(0)
    k = tl.load(tasks + 3 * T + t)
    if SHIFT + WIDTH < KEY_BITS:
        prefix = tl.load(state + t)
        remaining = tl.load(state + T + t)
    else:  # the first pass
        prefix = tl.zeros([], dtype=tl.int32)
        remaining = k.to(tl.int32)
    bins = tl.arange(0, BINS)
    counts = tl.load(hist + t * BINS + bins)
    from_top = tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts
    digit = tl.max(tl.where(from_top >= remaining, bins, -1), axis=0)
    remaining -= tl.sum(tl.where(bins > digit, counts, 0), axis=0)
    prefix = prefix | (digit << SHIFT)
    tl.store(state + t, prefix)
    tl.store(state + T + t, remaining)
    if LAST:
        if KEY_BITS == 15:
            thr = prefix.to(tl.int16).to(ref_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
        else:
            thr = prefix.to(tl.float32, bitcast=True)
        thr = tl.where(k == 0, float("inf"), thr)
        tl.store(thr_out + t, thr)


_threshold_tables: OrderedDict[tuple, tuple] = OrderedDict()


def _threshold_table(adapters: list[FlatAdapter], density: float, chunk: int):
    """(tasks [4, T] int64: input, offset, numel, k; chunk task [C] and chunk start [C] int32),
    on the device, built once per (layouts, density, chunk) and kept."""
    device = adapters[0].device

    def build():
        segments = [(i, s) for i, a in enumerate(adapters) for s in a.segments]
        tasks = torch.tensor(
            [[i, s.offset, s.numel, trim_k(s.numel, density)] for i, s in segments],
            dtype=torch.int64,
        ).reshape(-1, 4)
        numel = tasks[:, 2]
        per_task = (numel + chunk - 1) // chunk
        task = torch.repeat_interleave(torch.arange(len(numel)), per_task)
        first = torch.cumsum(per_task, 0) - per_task
        start = (torch.arange(len(task)) - first[task]) * chunk
        return (
            _to_device(tasks.T.contiguous(), device),
            _to_device(task.to(torch.int32), device),
            _to_device(start.to(torch.int32), device),
        )

    key = (tuple(layout_signature(a) for a in adapters), float(density), chunk, str(device))
    return lru_get(_threshold_tables, key, build, 64)


def segment_thresholds(
    adapters: list[FlatAdapter], density: float, block: int = THRESHOLD_BLOCK,
    num_warps: int = THRESHOLD_WARPS, digit_bits: int | None = None,
    chunk: int = THRESHOLD_CHUNK,
) -> list[torch.Tensor]:  # fmt: skip
    """Per adapter, float32 [segments]: the k-th largest |x| of each tensor (inf when k = 0).

    Radix select, DIGIT bits a pass (2 passes for bf16/fp16, 4 for fp32): each pass is one
    launch over every ``chunk`` of every tensor (``_threshold_hist_kernel``) and one over the
    tensors (``_threshold_select_kernel``).
    """
    device = adapters[0].device
    chunk = max(block, chunk // block * block)
    tasks, chunk_task, chunk_start = _threshold_table(adapters, density, chunk)
    n_tasks = tasks.shape[1]
    thr = torch.empty(n_tasks, dtype=torch.float32, device=device)
    if n_tasks:
        key_bits = 31 if adapters[0].buffer.element_size() == 4 else 15
        digit = digit_bits or THRESHOLD_DIGIT_BITS
        passes = (key_bits + digit - 1) // digit  # the top digit may be narrower
        hist = torch.zeros(passes, n_tasks << digit, dtype=torch.int32, device=device)
        state = torch.empty(2, n_tasks, dtype=torch.int32, device=device)
        x_ptrs = _address_table([a.buffer for a in adapters], device)
        ref = adapters[0].buffer
        for p in range(passes):
            shift = digit * (passes - 1 - p)
            if len(chunk_task):
                _threshold_hist_kernel[(len(chunk_task),)](
                    tasks, n_tasks, chunk_task, chunk_start, state, hist[p], x_ptrs, ref,
                    SHIFT=shift, WIDTH=digit, KEY_BITS=key_bits, CHUNK=chunk, BLOCK=block,
                    num_warps=num_warps,
                )  # fmt: skip
            _threshold_select_kernel[(n_tasks,)](
                tasks, n_tasks, state, hist[p], thr, ref, SHIFT=shift, WIDTH=digit,
                KEY_BITS=key_bits, LAST=p == passes - 1, num_warps=1,
            )  # fmt: skip
    return list(thr.split([len(a.segments) for a in adapters]))


@triton.jit
def _dare_uniform(seed_lo, seed_hi, adapter, segment, start, BLOCK: tl.constexpr):
    """``reference.dare_uniform`` for elements start .. start + BLOCK (start % 4 == 0)."""
    c0 = (start // 4 + tl.arange(0, BLOCK // 4)).to(tl.uint32)
    c1 = tl.zeros([BLOCK // 4], dtype=tl.uint32) + segment.to(tl.uint32)
    c2 = tl.zeros([BLOCK // 4], dtype=tl.uint32) + tl.cast(adapter, tl.uint32)
    c3 = tl.zeros([BLOCK // 4], dtype=tl.uint32)
    k0 = tl.cast(seed_lo, tl.uint32)
    k1 = tl.cast(seed_hi, tl.uint32)
    for _ in tl.static_range(_ROUNDS):
        p0 = c0
        p2 = c2
        c0 = tl.umulhi(p2, _M1) ^ c1 ^ k0
        c2 = tl.umulhi(p0, _M0) ^ c3 ^ k1
        c1 = p2 * _M1
        c3 = p0 * _M0
        k0 = k0 + _W0
        k1 = k1 + _W1
    words = tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), [BLOCK])  # c0 c1 c2 c3
    return (words >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _transformed_input(
    x_ptrs, thr_ptrs, out_ptr, in_off, in_seg, j, i, N, start, idx, n, density, divisor,
    seed_lo, seed_hi, MODE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Input i of output tensor j, trimmed or DARE'd, float32 (zeros where absent)."""
    off = tl.load(in_off + j * N + i)
    base = _load_input(x_ptrs, i, out_ptr)
    x = tl.load(base + off + idx, mask=idx < tl.where(off >= 0, n, 0), other=0).to(tl.float32)
    if MODE == 1:
        seg = tl.maximum(tl.load(in_seg + j * N + i), 0)
        thr = tl.load(tl.load(thr_ptrs + i).to(tl.pointer_type(tl.float32)) + seg)
        x = tl.where(tl.abs(x) >= thr, x, 0.0)
    elif MODE == 2:
        seg = tl.load(in_seg + j * N + i)
        u = _dare_uniform(seed_lo, seed_hi, i, seg, start, BLOCK)
        x = tl.where(u < density, x / divisor, 0.0)
    return x


@triton.jit
def _merge_kernel(
    out_ptr, x_ptrs, thr_ptrs, w_ptr, chunk_seg, chunk_start, seg_out_off, seg_numel, seg_is_b,
    in_off, in_seg, density, divisor, seed_lo, seed_hi, N: tl.constexpr,
    PER_SEGMENT: tl.constexpr, MODE: tl.constexpr, ELECT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    j = tl.load(chunk_seg + c)
    start = tl.load(chunk_start + c)
    n = tl.load(seg_numel + j)
    w_row = j if PER_SEGMENT else tl.load(seg_is_b + j)
    idx = start + tl.arange(0, BLOCK)
    inb = idx < n
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if ELECT == 0:
        for i in tl.static_range(N):
            x = _transformed_input(
                x_ptrs, thr_ptrs, out_ptr, in_off, in_seg, j, i, N, start, idx, n,
                density, divisor, seed_lo, seed_hi, MODE, BLOCK,
            )  # fmt: skip
            acc += x * tl.load(w_ptr + w_row * N + i)
    else:
        vote = tl.zeros([BLOCK], dtype=tl.float32)
        nonzero = tl.zeros([BLOCK], dtype=tl.int32)  # bit i: input i survived trim / DARE
        for i in tl.static_range(N):
            x = _transformed_input(
                x_ptrs, thr_ptrs, out_ptr, in_off, in_seg, j, i, N, start, idx, n,
                density, divisor, seed_lo, seed_hi, MODE, BLOCK,
            )  # fmt: skip
            if N <= 32:
                nonzero = nonzero | ((x != 0).to(tl.int32) << i)
            if ELECT == 1:
                vote += x
            else:
                vote += (x > 0).to(tl.float32) - (x < 0).to(tl.float32)
        positive = vote >= 0
        count = tl.zeros([BLOCK], dtype=tl.float32)
        for i in tl.static_range(N):
            if N <= 32:  # reload (from L2) and reuse the pass-1 mask instead of recomputing
                x = _transformed_input(
                    x_ptrs, thr_ptrs, out_ptr, in_off, in_seg, j, i, N, start, idx, n,
                    density, divisor, seed_lo, seed_hi, 0, BLOCK,
                )  # fmt: skip
                if MODE == 2:
                    x = x / divisor
                x = tl.where(((nonzero >> i) & 1) != 0, x, 0.0)
            else:
                x = _transformed_input(
                    x_ptrs, thr_ptrs, out_ptr, in_off, in_seg, j, i, N, start, idx, n,
                    density, divisor, seed_lo, seed_hi, MODE, BLOCK,
                )  # fmt: skip
            keep = tl.where(positive, x > 0, x < 0)
            acc += tl.where(keep, x * tl.load(w_ptr + w_row * N + i), 0.0)
            count += keep.to(tl.float32)
        acc = acc / tl.maximum(count, 1.0)
    out = out_ptr + tl.load(seg_out_off + j) + idx
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
    chunk_seg, chunk_start = plan.chunks(block)
    if len(chunk_seg) == 0:
        return
    n = len(buffers)
    tables = tuple(t.data_ptr() for t in buffers)
    tables += tuple(t.data_ptr() for t in thresholds) if mode == MODE_TRIM else (0,) * n
    if weights.device.type == "cpu":  # ride along in the same table, kept on the device
        flat = weights.flatten()

        def pack() -> torch.Tensor:
            packed = torch.empty(2 * n + (flat.numel() + 1) // 2, dtype=torch.int64)
            packed[: 2 * n] = torch.tensor(tables)
            packed[2 * n :].view(torch.float32)[: flat.numel()] = flat
            return _to_device(packed, out.device)

        key = (tables, tuple(flat.tolist()))
        packed = lru_get(_merge_tables, key, pack, _TABLE_CACHE_SIZE)
        weights = packed[2 * n :].view(torch.float32)
    else:
        packed = _to_device(torch.tensor(tables), out.device)
    x_ptrs, thr_ptrs = packed[:n], packed[n : 2 * n]
    # DARE divides the survivors by density; at density 0 none survives (u < 0 never holds), so
    # divide by 1 there rather than compute x / 0 for the dropped ones.
    divisor = float(density) if density > 0 else 1.0
    _merge_kernel[(len(chunk_seg),)](
        out, x_ptrs, thr_ptrs, weights, chunk_seg, chunk_start, plan.seg_out_off, plan.seg_numel,
        plan.seg_is_b, plan.in_off, plan.in_seg, float(density), divisor,
        seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, N=len(buffers),
        PER_SEGMENT=per_segment, MODE=mode, ELECT=elect, BLOCK=block, num_warps=num_warps,
    )  # fmt: skip


# Device copies of the (addresses, weights) table of elementwise_merge, by content: a table
# holds only the values it is keyed on, so reusing one is exact whatever the tensors are now.
_merge_tables: OrderedDict[tuple, torch.Tensor] = OrderedDict()


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
    base = _load_input(x_ptrs, i, out_ptr)
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
    w = _to_device(torch.stack([w1, w2]), out.device)
    _cat_kernel[(len(chunk_copy),)](
        out, _address_table(buffers, out.device), w[0], w[1], plan.copies, plan.copies.shape[1],
        chunk_copy, chunk_start, len(buffers), BLOCK=block, num_warps=4,
    )  # fmt: skip


@triton.jit
def _pair_stats_kernel(stats_ptr, x_ptrs, ref_ptr, seg_numel, in_off, BLOCK: tl.constexpr):
    """Per output tensor: (x0·x1, x0·x0, x1·x1) of its two inputs (absent = 0)."""
    j = tl.program_id(0)
    n = tl.load(seg_numel + j)
    off0 = tl.load(in_off + j * 2)
    off1 = tl.load(in_off + j * 2 + 1)
    base0 = _load_input(x_ptrs, 0, ref_ptr)
    base1 = _load_input(x_ptrs, 1, ref_ptr)
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
            stats, _address_table(buffers, device), buffers[0], plan.seg_numel, plan.in_off,
            BLOCK=block, num_warps=8,
        )  # fmt: skip
    return stats


__all__ = ["cat_merge", "elementwise_merge", "pair_stats", "segment_thresholds"]
