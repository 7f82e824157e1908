"""Triton kernels of the merge engine; ``reference`` holds their torch twins.

- ``_threshold_guess_kernel`` / ``_threshold_count_kernel`` / ``_threshold_narrow_kernel``:
  exact k-th largest |x| of every tensor of every adapter, on the magnitude bits of the storage
  dtype: a sample places 16 bins per tensor, a pass counts every chunk into them (four-bit
  counters packed in an int64; Triton's ``tl.histogram``, a ballot per key bit, cost ~7x more
  per element) and narrows to one bin (``segment_thresholds``).
- ``_merge_kernel``: per element across N inputs, trim or DARE, then weighted sum or TIES
  (sign election and disjoint mean), float32 inside, written once in the output dtype.
- ``_cat_kernel``: the rank concatenation, each input tensor copied (scaled) to its block of
  rows (A) or columns (B) of the output.
- ``_pair_stats_kernel``: per tensor dot products of two inputs, for slerp.

Inputs are passed as a table of buffer addresses, so one launch covers all adapters however many.
"""

from __future__ import annotations

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
# Threshold select: elements a count program reads per iteration (it reads 15), warps, sample
# size of the guess and its runs, multi-program passes by key bits (16-bit keys: the guessed
# bins, then their neighbours if they missed; float32: ~4 bits a pass after the guess).
THRESHOLD_BLOCK = 1024
THRESHOLD_WARPS = 4
THRESHOLD_SAMPLE = 4096
THRESHOLD_RUN = 32
THRESHOLD_PASSES = {15: 2, 31: 7}

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
def _sample_rank_keys(key, valid, rank_hi, rank_lo, KEY_BITS: tl.constexpr):
    """The rank_hi-th and rank_lo-th largest of the sample's keys, built bit by bit from the top:
    the largest v with #(key >= v) >= rank. Both counts share one reduction (16 bits each)."""
    hi = tl.zeros([], dtype=tl.int32)
    lo = tl.zeros([], dtype=tl.int32)
    for step in tl.static_range(KEY_BITS):
        bit = 1 << (KEY_BITS - 1 - step)
        both = (key >= (hi | bit)).to(tl.int32) + ((key >= (lo | bit)).to(tl.int32) << 16)
        both = tl.sum(tl.where(valid, both, 0), axis=0)
        hi = tl.where((both & 0xFFFF) >= rank_hi, hi | bit, hi)
        lo = tl.where((both >> 16) >= rank_lo, lo | bit, lo)
    return hi, lo


@triton.jit
def _input_tensor(tasks, T, t, x_ptrs, ref_ptr, ALIGNED: tl.constexpr):
    """(pointer to tensor t's first element, its numel); ALIGNED: both multiples of 16 (the
    host checked), which lets the loads be 16 bytes wide."""
    base = _load_input(x_ptrs, tl.load(tasks + t), ref_ptr)
    off = tl.load(tasks + T + t)
    n = tl.load(tasks + 2 * T + t)
    if ALIGNED:
        base = tl.multiple_of(base, 16)
        off = tl.multiple_of(off, 16)
        n = tl.multiple_of(n, 16)
    return base + off, n


@triton.jit
def _bin_counts(ptr, start, n, base, shift, KEY_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """int32 [16]: how many of the elements start .. start + 15·BLOCK (below n) fall in each bin
    b = clamp((key - base) >> shift, 0, 15). Each slot keeps 16 four-bit counters in one int64
    (one shift and one add an element; a slot sees 15 elements, so none overflows), unpacked
    once at the end. Bin 0 also holds the masked-out elements: callers never read it."""
    packed = tl.zeros([BLOCK], dtype=tl.int64)
    for r in tl.static_range(15):
        idx = start + r * BLOCK + tl.arange(0, BLOCK)
        key = _magnitude_key(tl.load(ptr + idx, mask=idx < n, other=0), KEY_BITS)
        b = tl.minimum(tl.maximum((key - base) >> shift, 0), 15)
        packed += tl.full([BLOCK], 1, tl.int64) << (b * 4).to(tl.int64)
    bins = tl.arange(0, 16)
    nibbles = (packed[None, :] >> (bins[:, None] * 4).to(tl.int64)) & 15
    return tl.sum(nibbles.to(tl.int32), axis=1)


@triton.jit
def _narrow(lo, hi, base, shift, counts, k):
    """The interval [lo, hi] holding the k-th largest key, narrowed by one pass's bin counts:
    bin b >= 1 holds the keys in [base + b·2^shift, base + (b+1)·2^shift) (bin 15: and above),
    so the k-th largest is in the highest bin whose count from the top reaches k."""
    bins = tl.arange(0, 16)
    from_top = tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts
    top = tl.sum(((from_top >= k) & (bins >= 1)).to(tl.int32), axis=0)  # 0: below bin 1
    step = tl.full([], 1, tl.int64) << shift
    new_lo = tl.where(top >= 1, base + top * step, lo)
    new_hi = tl.where(top < 15, base + (top + 1) * step - 1, hi)
    return tl.maximum(new_lo, lo), tl.minimum(new_hi, hi)


@triton.jit
def _spread(lo, hi, KEY_BITS: tl.constexpr):
    """(base, shift) of the next pass: 16 bins of 2^shift keys from lo that cover [lo, hi]."""
    shift = tl.zeros([], dtype=tl.int32)
    for s in tl.static_range(KEY_BITS):
        shift += ((tl.full([], 16, tl.int64) << s) < hi - lo + 1).to(tl.int32)
    return lo, shift


@triton.jit
def _key_to_float(key, ref_ptr, KEY_BITS: tl.constexpr):
    if KEY_BITS == 15:
        return key.to(tl.int16).to(ref_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
    return key.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _threshold_guess_kernel(
    tasks, T, state, counts, thr_out, x_ptrs, ref_ptr, KEY_BITS: tl.constexpr,
    SAMPLE: tl.constexpr, RUN: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """Per tensor: the first pass's bins, from a sample of SAMPLE elements (runs of RUN spread
    over the tensor). 16-bit keys: bins 1..14 are the single keys around the sample's
    k·SAMPLE/n-th largest (within 7 keys of the k-th largest unless the sample was unlucky;
    then later passes find it). float32: bins 1..14 of 2^shift keys span the sample's keys
    between those ranks ± 2.5 standard deviations. A tensor of at most SAMPLE elements is its
    own sample: its threshold is exact here. state = (lo, hi, base, shift), lo == hi once
    found."""
    t = tl.program_id(0)
    k = tl.load(tasks + 3 * T + t)
    ptr, n = _input_tensor(tasks, T, t, x_ptrs, ref_ptr, ALIGNED)
    s = tl.arange(0, SAMPLE)
    stride = tl.maximum(n // (SAMPLE // RUN), RUN)
    idx = (s // RUN) * stride + s % RUN
    valid = idx < n
    key = _magnitude_key(tl.load(ptr + idx, mask=valid, other=0), KEY_BITS)
    size = tl.minimum(n, SAMPLE)
    exact = size == n
    rank = tl.minimum(tl.maximum((k * size + n // 2) // tl.maximum(n, 1), 1), size)
    spread = tl.sqrt((rank * (size - rank)).to(tl.float32) / size.to(tl.float32))
    margin = tl.where(exact | (KEY_BITS == 15), 0, (2.5 * spread).to(tl.int64) + 1)
    hi_key, lo_key = _sample_rank_keys(
        key, valid, tl.maximum(rank - margin, 1), tl.minimum(rank + margin, size), KEY_BITS
    )
    if KEY_BITS == 15:
        lo_key = tl.where(exact, lo_key, lo_key - 7)
    lo_key = tl.maximum(lo_key, 1)  # bin 1 starts above 0: masked-out elements stay in bin 0
    shift = tl.zeros([], dtype=tl.int32)
    for b in tl.static_range(KEY_BITS):
        shift += ((tl.full([], 14, tl.int64) << b) < hi_key - lo_key + 1).to(tl.int32)
    # Bins 1..14 start at lo_key (base >= 0 keeps key - base within int32).
    base = tl.maximum(lo_key - (1 << shift), 0)
    done = (k == 0) | exact
    if done:  # exact: hi_key is the k-th largest key itself
        thr = _key_to_float(hi_key, ref_ptr, KEY_BITS)
        tl.store(thr_out + t, tl.where(k == 0, float("inf"), thr))
    tl.store(state + t, 0)
    tl.store(state + T + t, tl.where(done, 0, (1 << KEY_BITS) - 1))
    tl.store(state + 2 * T + t, base)
    tl.store(state + 3 * T + t, shift)
    tl.store(counts + t * 16 + tl.arange(0, 16), tl.zeros([16], dtype=tl.int32))


@triton.jit
def _threshold_count_kernel(
    tasks, T, chunk_task, chunk_start, state, counts, x_ptrs, ref_ptr, KEY_BITS: tl.constexpr,
    BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """One pass over one chunk (15·BLOCK elements) of one unfinished tensor: its bin counts,
    added to the tensor's (one atomic per non-empty bin)."""
    c = tl.program_id(0)
    t = tl.load(chunk_task + c)
    if tl.load(state + t) < tl.load(state + T + t):
        ptr, n = _input_tensor(tasks, T, t, x_ptrs, ref_ptr, ALIGNED)
        start = tl.load(chunk_start + c).to(tl.int64)
        if ALIGNED:
            start = tl.multiple_of(start, 16)
        base = tl.load(state + 2 * T + t)
        shift = tl.load(state + 3 * T + t)
        found = _bin_counts(ptr, start, n, base, shift, KEY_BITS, BLOCK)
        bins = tl.arange(0, 16)
        tl.atomic_add(counts + t * 16 + bins, found, mask=(bins >= 1) & (found > 0), sem="relaxed")


@triton.jit
def _threshold_narrow_kernel(
    tasks, T, state, counts, thr_out, x_ptrs, ref_ptr, KEY_BITS: tl.constexpr,
    BLOCK: tl.constexpr, FINISH: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """Per unfinished tensor, after a pass: narrow [lo, hi] and set the next pass's bins (16
    across [lo, hi]; where the pass's bins missed, 15 of the same width next to them, on the
    side of the k-th largest). With FINISH, the program itself runs the further passes its
    tensor needs (rare: the guess missed by more than one pass's bins), and writes the
    threshold."""
    t = tl.program_id(0)
    lo = tl.load(state + t).to(tl.int64)
    hi = tl.load(state + T + t).to(tl.int64)
    if lo < hi:
        k = tl.load(tasks + 3 * T + t)
        base = tl.load(state + 2 * T + t).to(tl.int64)
        shift = tl.load(state + 3 * T + t)
        bins = tl.arange(0, 16)
        new_lo, new_hi = _narrow(lo, hi, base, shift, tl.load(counts + t * 16 + bins), k)
        step = tl.full([], 1, tl.int64) << shift
        if new_hi - new_lo + 1 > 16 * step:  # missed: above, bin 1 at new_lo; below, 15 at new_hi
            base = tl.where(new_lo > lo, new_lo - step, new_hi + 1 - 16 * step)
        else:
            base, shift = _spread(new_lo, new_hi, KEY_BITS)
        lo, hi = new_lo, new_hi
        if FINISH:
            base, shift = _spread(lo, hi, KEY_BITS)
            ptr, n = _input_tensor(tasks, T, t, x_ptrs, ref_ptr, ALIGNED)
            while lo < hi:
                found = tl.zeros([16], dtype=tl.int32)
                for start in range(0, n, 15 * BLOCK):
                    found += _bin_counts(ptr, start, n, base, shift, KEY_BITS, BLOCK)
                lo, hi = _narrow(lo, hi, base, shift, found, k)
                base, shift = _spread(lo, hi, KEY_BITS)
        else:
            tl.store(counts + t * 16 + bins, tl.zeros([16], dtype=tl.int32))
        tl.store(state + t, lo.to(tl.int32))
        tl.store(state + T + t, hi.to(tl.int32))
        tl.store(state + 2 * T + t, base.to(tl.int32))
        tl.store(state + 3 * T + t, shift)
        if lo == hi:
            tl.store(thr_out + t, _key_to_float(lo, ref_ptr, KEY_BITS))


_threshold_tables: OrderedDict[tuple, tuple] = OrderedDict()


def _threshold_table(adapters: list[FlatAdapter], density: float, chunk: int):
    """(tasks [4, T] int64: input, offset, numel, k; chunk task [C] and chunk start [C] int32;
    whether every offset and numel is a multiple of 16), on the device, built once per
    (layouts, density, chunk) and kept."""
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
        aligned = bool((tasks[:, 1:3] % 16 == 0).all())
        return (
            _to_device(tasks.T.contiguous(), device),
            _to_device(task.to(torch.int32), device),
            _to_device(start.to(torch.int32), device),
            aligned,
        )

    key = (tuple(layout_signature(a) for a in adapters), float(density), chunk, str(device))
    return lru_get(_threshold_tables, key, build, 64)


def segment_thresholds(
    adapters: list[FlatAdapter], density: float, block: int = THRESHOLD_BLOCK,
    num_warps: int = THRESHOLD_WARPS, sample: int = THRESHOLD_SAMPLE,
) -> list[torch.Tensor]:  # fmt: skip
    """Per adapter, float32 [segments]: the k-th largest |x| of each tensor (inf when k = 0).

    A select on the magnitude bits that narrows, per tensor, an interval of keys holding the
    k-th largest: a guess from a sample sets the first pass's 16 bins (``_threshold_guess_kernel``),
    each pass counts every chunk of every unfinished tensor into its bins
    (``_threshold_count_kernel``) and narrows the interval to one bin
    (``_threshold_narrow_kernel``). 16-bit dtypes take one pass when the guess holds; float32,
    whose keys are 2^16 times finer, a few more.
    """
    assert sample < 1 << 16, "the guess counts its sample in 16-bit halves"
    device = adapters[0].device
    tasks, chunk_task, chunk_start, aligned = _threshold_table(adapters, density, 15 * block)
    n_tasks = tasks.shape[1]
    thr = torch.empty(n_tasks, dtype=torch.float32, device=device)
    if n_tasks:
        key_bits = 31 if adapters[0].buffer.element_size() == 4 else 15
        aligned = aligned and block % 16 == 0
        aligned = aligned and all(a.buffer.data_ptr() % 16 == 0 for a in adapters)
        state = torch.empty(4, n_tasks, dtype=torch.int32, device=device)
        counts = torch.empty(n_tasks, 16, dtype=torch.int32, device=device)
        x_ptrs = _address_table([a.buffer for a in adapters], device)
        ref = adapters[0].buffer
        _threshold_guess_kernel[(n_tasks,)](
            tasks, n_tasks, state, counts, thr, x_ptrs, ref, KEY_BITS=key_bits,
            SAMPLE=sample, RUN=min(THRESHOLD_RUN, sample), ALIGNED=aligned, num_warps=4,
        )  # fmt: skip
        passes = THRESHOLD_PASSES[key_bits]
        for p in range(passes):
            _threshold_count_kernel[(len(chunk_task),)](
                tasks, n_tasks, chunk_task, chunk_start, state, counts, x_ptrs, ref,
                KEY_BITS=key_bits, BLOCK=block, ALIGNED=aligned, num_warps=num_warps,
            )  # fmt: skip
            _threshold_narrow_kernel[(n_tasks,)](
                tasks, n_tasks, state, counts, thr, x_ptrs, ref, KEY_BITS=key_bits,
                BLOCK=block, FINISH=p == passes - 1, ALIGNED=aligned, num_warps=num_warps,
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
    seed_lo, seed_hi, MODE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """Input i of output tensor j, trimmed or DARE'd, float32 (zeros where absent)."""
    off = tl.load(in_off + j * N + i)
    limit = tl.where(off >= 0, n, 0)
    off = tl.maximum(off, 0)
    base = _load_input(x_ptrs, i, out_ptr)
    if ALIGNED:
        base = tl.multiple_of(base, 16)
        off = tl.multiple_of(off, 16)
    x = tl.load(base + off + idx, mask=idx < limit, other=0).to(tl.float32)
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
                density, divisor, seed_lo, seed_hi, MODE, BLOCK, ALIGNED,
            )  # fmt: skip
            acc += x * tl.load(w_ptr + w_row * N + i)
    else:
        vote = tl.zeros([BLOCK], dtype=tl.float32)
        nonzero = tl.zeros([BLOCK], dtype=tl.int32)  # bit i: input i survived trim / DARE
        for i in tl.static_range(N):
            x = _transformed_input(
                x_ptrs, thr_ptrs, out_ptr, in_off, in_seg, j, i, N, start, idx, n,
                density, divisor, seed_lo, seed_hi, MODE, BLOCK, ALIGNED,
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
                    density, divisor, seed_lo, seed_hi, 0, BLOCK, ALIGNED,
                )  # fmt: skip
                if MODE == 2:
                    x = x / divisor
                x = tl.where(((nonzero >> i) & 1) != 0, x, 0.0)
            else:
                x = _transformed_input(
                    x_ptrs, thr_ptrs, out_ptr, in_off, in_seg, j, i, N, start, idx, n,
                    density, divisor, seed_lo, seed_hi, MODE, BLOCK, ALIGNED,
                )  # fmt: skip
            keep = tl.where(positive, x > 0, x < 0)
            acc += tl.where(keep, x * tl.load(w_ptr + w_row * N + i), 0.0)
            count += keep.to(tl.float32)
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
    aligned = plan.aligned and block % 16 == 0
    aligned = aligned and all(p % 16 == 0 for p in (out.data_ptr(), *tables[:n]))
    # DARE divides the survivors by density; at density 0 none survives (u < 0 never holds), so
    # divide by 1 there rather than compute x / 0 for the dropped ones.
    divisor = float(density) if density > 0 else 1.0
    _merge_kernel[(len(chunk_seg),)](
        out, x_ptrs, thr_ptrs, weights, chunk_seg, chunk_start, plan.seg_out_off, plan.seg_numel,
        plan.seg_is_b, plan.in_off, plan.in_seg, float(density), divisor,
        seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, N=len(buffers),
        PER_SEGMENT=per_segment, MODE=mode, ELECT=elect, BLOCK=block, ALIGNED=aligned,
        num_warps=num_warps,
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
