"""Trim thresholds on the device: the exact k-th largest |x| of every tensor of every adapter.

``segment_thresholds`` selects on the magnitude bits of the storage dtype (the key) in a few
launches: ``_threshold_guess_kernel`` places 16 bins per tensor from a sample, then each pass of
``_threshold_count_kernel`` counts every chunk of every unfinished tensor into its bins and
the tensor's last chunk to finish narrows the interval of the k-th largest to one bin and sets
the next pass's bins (a ticket per tensor; no separate narrowing launch). Counting packs 16
four-bit counters in one int64 per slot (one shift and one add an element; Triton's
``tl.histogram``, a ballot per key bit, cost ~7x more per element) and folds them into four
int64 of 16-bit fields before the block sum. ``reference.segment_thresholds`` is the twin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hotmerge_kernels.layout import FlatAdapter
from hotmerge_kernels.lru import LockedLRU
from hotmerge_kernels.merge.plan import layout_signature
from hotmerge_kernels.merge.reference import trim_k
from hotmerge_kernels.merge.tables import address_table, load_input, to_device

# Threshold select: elements a count program reads per iteration (it reads 15), warps, sample
# size of the guess and its runs, passes by key bits (16-bit keys: the guessed bins, then their
# neighbours if they missed; float32: ~4 bits a pass after the guess).
THRESHOLD_BLOCK = 1024
THRESHOLD_WARPS = 4
THRESHOLD_SAMPLE = 4096
THRESHOLD_RUN = 32
THRESHOLD_PASSES = {15: 2, 31: 7}
# A program counts at most 15·BLOCK keys into one bin: its 16-bit fields hold up to 65535.
MAX_BLOCK = 4096


@triton.jit
def _magnitude_key(x, KEY_BITS: tl.constexpr):
    if KEY_BITS == 15:
        key = x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    else:
        key = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return key


@triton.jit
def _sample_rank_keys(key, rank_hi, rank_lo, KEY_BITS: tl.constexpr):
    """The rank_hi-th and rank_lo-th largest of the sample's keys, built bit by bit from the top:
    the largest v with #(key >= v) >= rank. Keys outside the sample are 0 and never count (every
    tested v is >= 1). Both counts share one reduction (16 bits each)."""
    hi = tl.zeros([], dtype=tl.int32)
    lo = tl.zeros([], dtype=tl.int32)
    if KEY_BITS == 15:
        # Both tests in one subtraction: lane = key + 0x8000 - v (>= 1, so no borrow between
        # lanes) has bit 15 set iff key >= v; the low lane tests hi, the high lane lo.
        pair = key | (key << 16) | -0x7FFF8000  # 0x80008000 as an int32
        for step in tl.static_range(KEY_BITS):
            bit = 1 << (KEY_BITS - 1 - step)
            both = tl.sum(((pair - ((hi | bit) | ((lo | bit) << 16))) >> 15) & 0x10001, axis=0)
            hi = tl.where((both & 0xFFFF) >= rank_hi, hi | bit, hi)
            lo = tl.where((both >> 16) >= rank_lo, lo | bit, lo)
    else:
        for step in tl.static_range(KEY_BITS):
            bit = 1 << (KEY_BITS - 1 - step)
            both = (key >= (hi | bit)).to(tl.int32) + ((key >= (lo | bit)).to(tl.int32) << 16)
            both = tl.sum(both, axis=0)
            hi = tl.where((both & 0xFFFF) >= rank_hi, hi | bit, hi)
            lo = tl.where((both >> 16) >= rank_lo, lo | bit, lo)
    return hi, lo


@triton.jit
def _input_tensor(tasks, T, t, x_ptrs, ref_ptr, ALIGNED: tl.constexpr):
    """(pointer to tensor t's first element, its numel); ALIGNED: both multiples of 16 (the
    host checked), which lets the loads be 16 bytes wide."""
    base = load_input(x_ptrs, tl.load(tasks + t), ref_ptr)
    off = tl.load(tasks + T + t)
    n = tl.load(tasks + 2 * T + t)
    if ALIGNED:
        base = tl.multiple_of(base, 16)
        off = tl.multiple_of(off, 16)
        n = tl.multiple_of(n, 16)
    return base + off, n


@triton.jit
def _bin_counts(
    ptr, start, n, base, shift, KEY_BITS: tl.constexpr, BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr, SHIFTED: tl.constexpr = True,
):  # fmt: skip
    """int32 [16]: how many of the elements start .. start + 15·BLOCK (below n) fall in each bin
    b = clamp((key - base) >> shift, 0, 15) (SHIFTED False: shift is 0, the usual first pass of
    16-bit keys, and the shift is skipped). Each slot keeps 16 four-bit counters in one int64
    (one shift and one add an element; a slot sees 15 elements, so none overflows). Before the
    block sum the nibbles spread to 16-bit fields, four bins an int64 (bins j, j+4, j+8, j+12),
    so the sum is four reductions, not 16. Bin 0 also holds the masked-out elements: callers
    never read it."""
    packed = tl.zeros([BLOCK], dtype=tl.int64)
    for r in tl.static_range(15):
        idx = start + r * BLOCK + tl.arange(0, BLOCK)
        ptrs = ptr + idx
        if ALIGNED:  # on the pointers: Triton 3.6 drops a hint on the pointer cast from the table
            ptrs = tl.multiple_of(ptrs, 16)  # each run of 16 starts 16-byte aligned
        key = _magnitude_key(tl.load(ptrs, mask=idx < n, other=0), KEY_BITS)
        d = key - base
        if SHIFTED:
            d = d >> shift
        b = tl.minimum(tl.maximum(d, 0), 15)
        packed += tl.full([BLOCK], 1, tl.int64) << (b * 4).to(tl.int64)
    fields = 0x000F000F000F000F
    s0 = tl.sum(packed & fields, axis=0)
    s1 = tl.sum((packed >> 4) & fields, axis=0)
    s2 = tl.sum((packed >> 8) & fields, axis=0)
    s3 = tl.sum((packed >> 12) & fields, axis=0)
    bins = tl.arange(0, 16)
    j = bins % 4
    s = tl.where(j == 0, s0, tl.where(j == 1, s1, tl.where(j == 2, s2, s3)))
    return ((s >> ((bins // 4) * 16).to(tl.int64)) & 0xFFFF).to(tl.int32)


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
    tasks, T, state, counts, tickets, thr_out, x_ptrs, ref_ptr, KEY_BITS: tl.constexpr,
    SAMPLE: tl.constexpr, RUN: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """Per tensor: the first pass's bins, from a sample of SAMPLE elements (runs of RUN spread
    over the tensor). 16-bit keys: bins 1..14 are the single keys around the sample's
    k·SAMPLE/n-th largest (within 7 keys of the k-th largest unless the sample was unlucky;
    then later passes find it). float32: bins 1..14 of 2^shift keys span the sample's keys
    between those ranks ± 2.5 standard deviations. A tensor of at most SAMPLE elements is its
    own sample: its threshold is exact here. state = (lo, hi, base, shift), lo == hi once
    found; the tensor's counts and ticket start at 0."""
    t = tl.program_id(0)
    k = tl.load(tasks + 3 * T + t)
    ptr, n = _input_tensor(tasks, T, t, x_ptrs, ref_ptr, ALIGNED)
    s = tl.arange(0, SAMPLE)
    stride = tl.maximum(n // (SAMPLE // RUN), RUN)
    idx = (s // RUN) * stride + s % RUN
    key = _magnitude_key(tl.load(ptr + idx, mask=idx < n, other=0), KEY_BITS)
    size = tl.minimum(n, SAMPLE)
    exact = size == n
    rank = tl.minimum(tl.maximum((k * size + n // 2) // tl.maximum(n, 1), 1), size)
    spread = tl.sqrt((rank * (size - rank)).to(tl.float32) / size.to(tl.float32))
    margin = tl.where(exact | (KEY_BITS == 15), 0, (2.5 * spread).to(tl.int64) + 1)
    hi_key, lo_key = _sample_rank_keys(
        key, tl.maximum(rank - margin, 1), tl.minimum(rank + margin, size), KEY_BITS
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
    tl.store(tickets + t, 0)


@triton.jit
def _narrow_tensor(
    tasks, T, t, state, counts, thr_out, ptr, n, ref_ptr, KEY_BITS: tl.constexpr,
    BLOCK: tl.constexpr, FINISH: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """After a pass over tensor t: narrow [lo, hi] and set the next pass's bins (16 across
    [lo, hi]; where the pass's bins missed, 15 of the same width next to them, on the side of
    the k-th largest). With FINISH (the last pass), the program itself runs the further passes
    the tensor needs (rare: the guess missed by more than one pass's bins). Writes the
    threshold once lo == hi."""
    lo = tl.load(state + t).to(tl.int64)
    hi = tl.load(state + T + t).to(tl.int64)
    k = tl.load(tasks + 3 * T + t)
    base = tl.load(state + 2 * T + t).to(tl.int64)
    shift = tl.load(state + 3 * T + t)
    new_lo, new_hi = _narrow(lo, hi, base, shift, counts, k)
    step = tl.full([], 1, tl.int64) << shift
    if new_hi - new_lo + 1 > 16 * step:  # missed: above, bin 1 at new_lo; below, 15 at new_hi
        base = tl.where(new_lo > lo, new_lo - step, new_hi + 1 - 16 * step)
    else:
        base, shift = _spread(new_lo, new_hi, KEY_BITS)
    lo, hi = new_lo, new_hi
    if FINISH:
        base, shift = _spread(lo, hi, KEY_BITS)
        while lo < hi:
            found = tl.zeros([16], dtype=tl.int32)
            for start in range(0, n, 15 * BLOCK):
                found += _bin_counts(ptr, start, n, base, shift, KEY_BITS, BLOCK, ALIGNED)
            lo, hi = _narrow(lo, hi, base, shift, found, k)
            base, shift = _spread(lo, hi, KEY_BITS)
    tl.store(state + t, lo.to(tl.int32))
    tl.store(state + T + t, hi.to(tl.int32))
    tl.store(state + 2 * T + t, base.to(tl.int32))
    tl.store(state + 3 * T + t, shift)
    if lo == hi:
        tl.store(thr_out + t, _key_to_float(lo, ref_ptr, KEY_BITS))


@triton.jit
def _threshold_count_kernel(
    tasks, T, chunk_task, chunk_start, state, counts, tickets, thr_out, x_ptrs, ref_ptr,
    KEY_BITS: tl.constexpr, BLOCK: tl.constexpr, FINISH: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """One pass over one chunk (15·BLOCK elements) of one unfinished tensor: its bin counts,
    added to the tensor's (one atomic per non-empty bin). The tensor's last chunk to arrive
    (its ticket) then narrows the tensor (``_narrow_tensor``)."""
    c = tl.program_id(0)
    t = tl.load(chunk_task + c)
    if tl.load(state + t) < tl.load(state + T + t):
        ptr, n = _input_tensor(tasks, T, t, x_ptrs, ref_ptr, ALIGNED)
        start = tl.load(chunk_start + c).to(tl.int64)
        if ALIGNED:
            start = tl.multiple_of(start, 16)
        base = tl.load(state + 2 * T + t)
        shift = tl.load(state + 3 * T + t)
        if shift == 0:
            found = _bin_counts(ptr, start, n, base, shift, KEY_BITS, BLOCK, ALIGNED, False)
        else:
            found = _bin_counts(ptr, start, n, base, shift, KEY_BITS, BLOCK, ALIGNED)
        bins = tl.arange(0, 16)
        tl.atomic_add(counts + t * 16 + bins, found, mask=(bins >= 1) & (found > 0), sem="relaxed")
        # Every thread's count atomics, then one release: the last arriver sees them all (the
        # pattern of a grid barrier: bar.sync, then a gpu-scope release by one thread).
        tl.debug_barrier()
        ticket = tl.atomic_add(tickets + t, 1, sem="acq_rel")
        if ticket == (n + 15 * BLOCK - 1) // (15 * BLOCK) - 1:
            # Read the totals and zero them for the next pass in one atomic per bin.
            total = tl.atomic_xchg(counts + t * 16 + bins, tl.zeros([16], tl.int32), sem="relaxed")
            tl.store(tickets + t, 0)
            _narrow_tensor(
                tasks, T, t, state, total, thr_out, ptr, n, ref_ptr, KEY_BITS, BLOCK, FINISH,
                ALIGNED,
            )  # fmt: skip


class _Launch:
    """What a select over one combination of layouts needs besides the buffers, built once:
    the task table (int64 [4, T]: input, offset, numel, k), each chunk's task and start (int32
    [C]), and whether every offset and numel is a multiple of 16."""

    def __init__(self, adapters: list[FlatAdapter], density: float, chunk: int):
        device = adapters[0].device
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
        self.n_tasks = len(segments)
        self.n_chunks = len(task)
        self.aligned = bool((tasks[:, 1:3] % 16 == 0).all())
        self.tasks = to_device(tasks.T.contiguous(), device)
        self.chunk_task = to_device(task.to(torch.int32), device)
        self.chunk_start = to_device(start.to(torch.int32), device)


_LAUNCHES: LockedLRU[_Launch] = LockedLRU(64)


def _launch_table(adapters: list[FlatAdapter], density: float, chunk: int) -> _Launch:
    key = (
        tuple(layout_signature(a) for a in adapters),
        float(density),
        chunk,
        str(adapters[0].device),
    )
    return _LAUNCHES.get(key, lambda: _Launch(adapters, density, chunk))


def segment_thresholds(
    adapters: list[FlatAdapter], density: float, block: int = THRESHOLD_BLOCK,
    num_warps: int = THRESHOLD_WARPS, sample: int = THRESHOLD_SAMPLE,
) -> list[torch.Tensor]:  # fmt: skip
    """Per adapter, float32 [segments]: the k-th largest |x| of each tensor (inf when k = 0).

    A select on the magnitude bits that narrows, per tensor, an interval of keys holding the
    k-th largest: a guess from a sample sets the first pass's 16 bins (``_threshold_guess_kernel``),
    each pass counts every chunk of every unfinished tensor into its bins and narrows the
    interval to one bin (``_threshold_count_kernel``). 16-bit dtypes take one pass when the
    guess holds; float32, whose keys are 2^16 times finer, a few more.
    """
    thr, _ = select(adapters, density, block, num_warps, sample)
    return list(thr.split([len(a.segments) for a in adapters]))


def select(
    adapters: list[FlatAdapter], density: float, block: int = THRESHOLD_BLOCK,
    num_warps: int = THRESHOLD_WARPS, sample: int = THRESHOLD_SAMPLE, finish: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(thresholds float32 [T], state int32 [4, T]: lo, hi, base, shift). Without ``finish`` no
    program runs the in-program finisher: tensors with lo < hi are what it would have finished
    (the benchmark counts them)."""
    assert sample < 1 << 16, "the guess counts its sample in 16-bit halves"
    assert block <= MAX_BLOCK, "a program's bin counts are summed in 16-bit fields"
    launch = _launch_table(adapters, density, 15 * block)
    device = adapters[0].device
    T = launch.n_tasks
    # One allocation: state [4, T], counts [T, 16], tickets [T], thresholds [T] (float32).
    work = torch.empty(22 * T, dtype=torch.int32, device=device)
    state, counts, tickets = work[: 4 * T], work[4 * T : 20 * T], work[20 * T : 21 * T]
    thr = work[21 * T :].view(torch.float32)
    if T:
        key_bits = 31 if adapters[0].buffer.element_size() == 4 else 15
        aligned = launch.aligned and block % 16 == 0
        aligned = aligned and all(a.buffer.data_ptr() % 16 == 0 for a in adapters)
        x_ptrs = address_table([a.buffer for a in adapters], device)
        ref = adapters[0].buffer
        _threshold_guess_kernel[(T,)](
            launch.tasks, T, state, counts, tickets, thr, x_ptrs, ref, KEY_BITS=key_bits,
            SAMPLE=sample, RUN=min(THRESHOLD_RUN, sample), ALIGNED=aligned, num_warps=4,
        )  # fmt: skip
        passes = THRESHOLD_PASSES[key_bits]
        for p in range(passes):
            _threshold_count_kernel[(launch.n_chunks,)](
                launch.tasks, T, launch.chunk_task, launch.chunk_start, state, counts, tickets,
                thr, x_ptrs, ref, KEY_BITS=key_bits, BLOCK=block,
                FINISH=finish and p == passes - 1, ALIGNED=aligned, num_warps=num_warps,
            )  # fmt: skip
    return thr, state.view(4, T)
