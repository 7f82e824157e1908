"""Plain-torch twins of the Triton merge kernels, vectorised over whole flat buffers.

Each function here computes exactly what its namesake in ``triton_merge`` computes (same float32
operations in the same order, same random stream), so either can run a merge; this one runs
where ``backend.use_triton`` says torch (no CUDA device, or ``HOTMERGE_TRITON=0``), and is the
tests' oracle for the kernels. It imports no Triton. Work is done in chunks of output elements to
bound memory, never tensor by tensor.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch

from hotmerge_kernels.layout import FlatAdapter
from hotmerge_kernels.merge.plan import MergePlan

# Pre-merge transforms and sign elections, as the kernels number them.
MODE_NONE, MODE_TRIM, MODE_DARE = 0, 1, 2
ELECT_NONE, ELECT_TOTAL, ELECT_FREQUENCY = 0, 1, 2

_CHUNK = {"cpu": 1 << 22, "cuda": 1 << 25}  # output elements per step, by device type

# Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011).
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
_U32 = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a·m for uint32 values held in int64, without overflow."""
    p_lo = (a & 0xFFFF) * m
    p_hi = (a >> 16) * m
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & _U32
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on int64 tensors holding uint32 counters; returns the four output words."""
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & _U32
        k1 = (k1 + PHILOX_W1) & _U32
    return c0, c1, c2, c3


DARE_DRAWS = 8  # 16-bit draws per Philox call: the four output words, two halves each
DARE_ONE = 1 << 16  # a draw is in [0, DARE_ONE)


def dare_threshold(density: float) -> int:
    """DARE's keep threshold T: an element is kept iff its 16-bit draw is below T, the nearest
    integer to density · 65536 (halves up) clamped to [0, 65536]. It keeps with probability
    T / 65536, within 2^-17 of ``density`` in [0, 1]: density 0 keeps none, 1 keeps all."""
    if not density > 0:
        return 0
    if density >= 1:
        return DARE_ONE
    scaled = density * DARE_ONE  # exact: a power-of-two scaling
    whole = math.floor(scaled)
    return whole + int(scaled - whole >= 0.5)  # the fraction is exact too


def dare_draws(seed: int, adapter: int, segment: torch.Tensor, local: torch.Tensor):
    """The DARE stream: a 16-bit draw in [0, 65536) per element (int64).

    Key = (seed low 32 bits, seed high 32 bits); counter = (local // 8, index of the tensor in
    the adapter's segment table, position of the adapter in the merge, 0). Of the four output
    words w0..w3, element ``local`` takes draw d = local % 8: bits 16·(d % 2) .. 16·(d % 2) + 15
    of word w(d // 2), so the eight draws of a call are w0 low, w0 high, w1 low, ..., w3 high
    (the words' little-endian 16-bit halves). ``local`` is the element's index inside its tensor,
    so the stream does not depend on block sizes, launch shapes or devices.
    """
    zero = torch.zeros_like(local)
    words = philox4x32(
        local >> 3, segment & _U32, zero + adapter, zero, seed & _U32, seed >> 32 & _U32
    )
    draw = local & 7
    word = torch.stack(words).gather(0, (draw >> 1)[None])[0]
    return (word >> ((draw & 1) << 4)) & 0xFFFF


def dare_keep(seed: int, adapter: int, segment, local: torch.Tensor, density: float):
    """bool per element: DARE keeps it (its draw below ``dare_threshold(density)``)."""
    return dare_draws(seed, adapter, segment, local) < dare_threshold(density)


def _magnitude_bits(buffer: torch.Tensor) -> tuple[torch.Tensor, int]:
    if buffer.element_size() == 4:
        return buffer.view(torch.int32).to(torch.int64) & 0x7FFFFFFF, 31
    return buffer.view(torch.int16).to(torch.int64) & 0x7FFF, 15


def bits_to_float(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float32:
        return bits.to(torch.int32).view(torch.float32)
    return bits.to(torch.int16).view(dtype).to(torch.float32)


def trim_k(numel: int, density: float) -> int:
    """How many elements trim keeps (ties aside): PEFT's ``int(density * numel)``."""
    return min(int(density * numel), numel)


def segment_thresholds(adapters: list[FlatAdapter], density: float) -> list[torch.Tensor]:
    """Per adapter, float32 [segments]: the k-th largest |x| of each tensor (inf when k = 0)."""
    return [_thresholds(a, density) for a in adapters]


def _thresholds(adapter: FlatAdapter, density: float) -> torch.Tensor:
    device = adapter.device
    numel = torch.tensor([s.numel for s in adapter.segments], device=device)
    offset = torch.tensor([s.offset for s in adapter.segments], device=device)
    k = torch.tensor([trim_k(s.numel, density) for s in adapter.segments], device=device)
    start = torch.cumsum(numel, 0) - numel
    total = int(numel.sum())
    idx = torch.repeat_interleave(offset - start, numel) + torch.arange(total, device=device)
    seg = torch.repeat_interleave(torch.arange(len(numel), device=device), numel)
    bits, _ = _magnitude_bits(adapter.buffer)
    # Sort by segment, then by magnitude descending: the k-th largest sits at start + k - 1.
    ordered = torch.sort((seg << 32) | (0x7FFFFFFF - bits[idx])).values
    pick = (start + k - 1).clamp(0, max(total - 1, 0))
    kth = 0x7FFFFFFF - (ordered[pick] & _U32) if total else torch.zeros_like(k)
    thr = bits_to_float(kth, adapter.dtype)
    return torch.where(k == 0, torch.full_like(thr, float("inf")), thr)


def _chunks(plan: MergePlan, total: int | None = None):
    """(e0, e1) ranges over ``total`` elements (default: the output's), bounding memory."""
    total = plan.total if total is None else total
    step = _CHUNK.get(plan.seg_out_off.device.type, 1 << 22)
    for e0 in range(0, total, step):
        yield e0, min(e0 + step, total)


class MergeCancelled(Exception):
    """``cancel()`` returned True between two chunks of a merge: it stopped there."""


def check_cancel(cancel: Callable[[], bool] | None) -> None:
    if cancel is not None and cancel():
        raise MergeCancelled("merge cancelled")


def _locate(plan: MergePlan, e0: int, e1: int):
    e = torch.arange(e0, e1, device=plan.seg_out_off.device)
    seg = torch.searchsorted(plan.seg_out_off, e, right=True) - 1
    return seg, e - plan.seg_out_off[seg]


def _weight(weights, per_segment, seg, is_b, i):
    return weights[seg, i] if per_segment else weights[is_b, i]


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
    block: int | None = None,  # unused: the kernel's launch shape, for a uniform signature
    cancel: Callable[[], bool] | None = None,
) -> None:
    """out = merge over inputs of (trim | DARE | nothing) then (weighted sum | TIES).

    ``weights`` is float32 [2, N] (row 0 for A tensors, row 1 for B) or, with ``per_segment``,
    [S, N]. Absent inputs read as zeros, which add nothing and never vote.
    """
    n = len(buffers)
    weights = weights.to(out.device)
    divisor = density if density > 0 else 1.0  # DARE at density 0 keeps nothing: never x / 0
    keep_below = dare_threshold(density)
    for e0, e1 in _chunks(plan):
        check_cancel(cancel)
        seg, local = _locate(plan, e0, e1)
        is_b = plan.seg_is_b[seg]
        xs = []
        for i in range(n):
            off = plan.in_off[seg, i]
            present = off >= 0
            x = buffers[i][torch.where(present, off + local, 0)].to(torch.float32)
            x = torch.where(present, x, 0.0)
            if mode == MODE_TRIM:
                thr = thresholds[i][plan.in_seg[seg, i].clamp_min(0)]
                x = torch.where(x.abs() >= thr, x, 0.0)
            elif mode == MODE_DARE:
                draw = dare_draws(seed, i, plan.in_seg[seg, i], local)
                x = torch.where(draw < keep_below, x / divisor, 0.0)
            xs.append(x)
        acc = torch.zeros_like(xs[0])
        if elect == ELECT_NONE:
            for i, x in enumerate(xs):
                acc = acc + x * _weight(weights, per_segment, seg, is_b, i)
        else:
            vote = torch.zeros_like(acc)
            for x in xs:
                vote = vote + (x if elect == ELECT_TOTAL else torch.sign(x))
            positive = vote >= 0
            count = torch.zeros_like(acc)
            for i, x in enumerate(xs):
                keep = torch.where(positive, x > 0, x < 0)
                acc = acc + torch.where(keep, x * _weight(weights, per_segment, seg, is_b, i), 0.0)
                count = count + keep.to(torch.float32)
            acc = acc / count.clamp_min(1.0)
        out[e0 : e0 + len(acc)] = acc.to(out.dtype)


def cat_merge(
    out: torch.Tensor,
    plan: MergePlan,
    buffers: list[torch.Tensor],
    w1: torch.Tensor,
    w2: torch.Tensor,
    block: int | None = None,
    cancel: Callable[[], bool] | None = None,
) -> None:
    """Concatenate ranks: each input tensor, times w1·w2, to its block of rows (A) or columns
    (B) of the output, as ``plan.copies`` lays out; uncovered elements are zero.

    ``w1``, ``w2``: float32 [2, N], row 0 for A, row 1 for B. Input by input, so that the work
    is linear in the number of elements copied whatever the number of adapters.
    """
    w1, w2 = w1.to(out.device), w2.to(out.device)
    out.zero_()
    inp = plan.copies[0]
    order = torch.argsort(inp, stable=True)
    counts = torch.bincount(inp, minlength=len(buffers)).tolist()
    firsts = [0, *itertools.accumulate(counts)]
    for i, buffer in enumerate(buffers):
        mine = plan.copies[:, order[firsts[i] : firsts[i + 1]]]  # this input's copies
        _, src, numel, dst, width, stride, is_b = mine
        first = torch.cumsum(numel, 0) - numel  # where each copy starts among them
        for e0, e1 in _chunks(plan, int(numel.sum())):
            check_cancel(cancel)
            g = torch.arange(e0, e1, device=out.device)
            c = torch.searchsorted(first, g, right=True) - 1
            e = g - first[c]
            at = dst[c] + (e // width[c]) * stride[c] + e % width[c]
            x = buffer[src[c] + e].to(torch.float32)
            b = is_b[c]
            out[at] = (x * w1[b, i] * w2[b, i]).to(out.dtype)


def pair_stats(
    plan: MergePlan,
    buffers: list[torch.Tensor],
    block: int | None = None,
    cancel: Callable[[], bool] | None = None,
):
    """float32 [S, 3]: per output tensor, (x0·x1, x0·x0, x1·x1) of two inputs (absent = 0)."""
    sums = torch.zeros(len(plan.segments), 3, dtype=torch.float64, device=plan.in_off.device)
    for e0, e1 in _chunks(plan):
        check_cancel(cancel)
        seg, local = _locate(plan, e0, e1)
        xs = []
        for i in range(2):
            off = plan.in_off[seg, i]
            x = buffers[i][torch.where(off >= 0, off + local, 0)].to(torch.float64)
            xs.append(torch.where(off >= 0, x, 0.0))
        terms = torch.stack([xs[0] * xs[1], xs[0] * xs[0], xs[1] * xs[1]], dim=1)
        sums.index_add_(0, seg, terms)
    return sums.to(torch.float32)
