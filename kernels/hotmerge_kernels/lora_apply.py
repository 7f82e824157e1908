"""Multi-LoRA apply as two Triton kernels per projection group: shrink, then expand.

The engine keeps every loaded adapter in a *slot* of a stacked pool and tags each token (decode
row or prefill token) with its slot, -1 meaning the base model only:

- ``lora_a (slots, slices, max_rank, in)``: A of each slice (q/k/v: 3, gate/up: 2, o or down: 1).
- ``lora_b (slots, max_rank, out_total)``: B, transposed, with the LoRA scaling folded in; slice
  ``s`` owns the output columns ``slice_offsets[s]:slice_offsets[s + 1]``. Rank-major, so expand
  reads each rank row in use as one contiguous run, however wide the pool's ``max_rank``.
- ``slot_ranks (slots,) int32``: rank used by each slot (0: empty); columns past it are never read.

Shrink splits ``in`` into ``splits`` consecutive ranges (``splits = buf.shape[0]``) and writes the
partial product of range ``p`` into its own place of a float32 workspace
``buf (splits, slices, T, max_rank)``: ``buf[p, s, t, :r] = x[t, range p] @ A[slot_t, s, :r,
range p].T``. Expand sums the partials in the fixed order ``p = 0, 1, ...`` as it loads them,
rounds the sum to B's dtype and adds ``h @ lora_b[slot_t, :r, slice s]`` into ``y (T, out_total)``
in place (float32 accumulation, one read-modify-write of ``y``). No atomics: a token's result is
the same at every run, eager or replayed. Rows of ``y`` whose slot is -1 (or an empty slot) are
not touched; of ``buf``, only the rank prefixes of rows with a slot are written (all splits,
empty ranges as zeros). Slots must be < the pool's slot count: they are not checked on the device.

``lora_splits(in, T)`` is the split count the engine uses, a function of shapes only, so a
captured graph is fixed: at decode (T <= ``DECODE_MAX_TOKENS``) one split per ``SPLIT_WIDTH``
features, which gives the GPU hundreds of programs even at batch 1; a prefill of up to
``SPLIT_MAX_TOKENS`` tokens splits too, into at most ``PREFILL_MAX_SPLITS`` ranges (a 128-token
prompt is two m tiles: unsplit, a few programs would each walk all of ``in``); longer prefills
have tiles enough and keep one split.
``lora_workspace`` allocates a buffer for every group of a forward; each group uses its leading
``lora_splits`` splits and slices.

Two kernel pairs, chosen by T:

- Decode (T <= ``DECODE_MAX_TOKENS``): one program per token and (slice, split) for shrink, per
  token and n tile for expand, reading the token's slot directly: matrix-vector products in
  float32 (a batch's rows mostly have distinct adapters; rows that share one read it again from
  L2). Grids: (slices x splits, T) and (n tiles, T). On Hopper both are launched as programmatic
  dependents: each reads its adapter weights before ``gdc_wait`` and what the previous kernel
  wrote (x; the partials and y) after, so expand's B loads overlap shrink.
- Prefill: tokens grouped by slot (``LoraKernelMeta``: a stable sort of the slots and each run's
  start, length and slot), each program a tensor-core tile of up to ``BLOCK_M`` tokens of one
  group, so tokens that share an adapter share its weight reads. Grids: (slices x splits, m
  tiles, groups) and (n tiles, m tiles, groups), groups being ``min(T, slots + 1)``; programs of
  absent groups or past a group's length exit at once.

Expand's n tiles never straddle two slices. Tile sizes are fixed per path, not autotuned: the
same tiles and the same sums in every process. Nothing syncs with the host and the launches
allocate nothing (``meta.update``'s temporaries come from the graph's pool when captured), so the
calls can be captured in a CUDA graph once compiled. The prefill launches build a ``meta`` when
none is passed; decode launches need none.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .lora_apply_reference import lora_expand_torch, lora_shrink_torch
from .pdl import launch_options

__all__ = [
    "LoraKernelMeta",
    "lora_apply",
    "lora_expand",
    "lora_expand_torch",
    "lora_shrink",
    "lora_shrink_torch",
    "lora_splits",
    "lora_workspace",
]

MAX_SLICES = 3
DECODE_MAX_TOKENS = 64  # up to this many tokens: decode tiles and split in_features
SPLIT_WIDTH = 512  # in_features per shrink split at decode (16 KB of A per rank-16 program)
SPLIT_MAX_TOKENS = 512  # prefills up to this many tokens split in_features too
PREFILL_MAX_SPLITS = 8  # prefill expand unrolls its sum over the splits: keep it short


def lora_splits(in_features: int, tokens: int) -> int:
    """Ranges shrink splits ``in_features`` into for ``tokens`` tokens (shapes only)."""
    splits = triton.cdiv(in_features, SPLIT_WIDTH)
    if tokens <= DECODE_MAX_TOKENS:
        return splits
    return min(splits, PREFILL_MAX_SPLITS) if tokens <= SPLIT_MAX_TOKENS else 1


def lora_workspace(
    in_features: Sequence[int],
    max_slices: int,
    tokens: int,
    max_rank: int,
    device: torch.device | str,
) -> torch.Tensor:
    """Shrink's float32 buffer for projection groups of these ``in_features``; a group of ``k``
    inputs and ``n`` slices uses ``buf[:lora_splits(k, tokens), :n]``."""
    splits = max(lora_splits(k, tokens) for k in in_features)
    return torch.empty((splits, max_slices, tokens, max_rank), dtype=torch.float32, device=device)


class LoraKernelMeta:
    """Tokens grouped by adapter slot for the prefill launches, in fixed device buffers (built
    once, updated every forward).

    ``update(token_slots)`` runs device ops only (sort, cumsum, scatter), so it can be captured in
    the same CUDA graph as the kernels; call it once per step, before every layer's
    ``lora_shrink`` / ``lora_expand`` with those ``token_slots``. Groups are numbered in slot
    order; group entries past the last group hold slot -1.
    """

    def __init__(self, max_tokens: int, num_slots: int, device: torch.device | str) -> None:
        self.max_tokens = max_tokens
        self.num_slots = num_slots
        self.num_tokens = 0  # T of the last update (a host int: the launches check it)
        self.order = torch.zeros(max_tokens, dtype=torch.int32, device=device)  # tokens by slot
        self.group_slot = torch.full((max_tokens,), -1, dtype=torch.int32, device=device)
        self.group_start = torch.zeros(max_tokens, dtype=torch.int32, device=device)
        self.group_count = torch.zeros(max_tokens, dtype=torch.int32, device=device)

    def update(self, token_slots: torch.Tensor) -> None:
        t = token_slots.shape[0]
        if t > self.max_tokens:
            raise ValueError(
                f"token_slots has {t} tokens, the meta was built for {self.max_tokens}"
            )
        self.num_tokens = t
        if t == 0:
            return
        sorted_slots, order = torch.sort(token_slots.to(torch.int32), stable=True)
        first = torch.ones(t, dtype=torch.bool, device=token_slots.device)
        first[1:] = sorted_slots[1:] != sorted_slots[:-1]
        group = torch.cumsum(first, 0) - 1  # group of each sorted token
        self.order[:t].copy_(order)
        self.group_slot.fill_(-1)
        self.group_slot.scatter_(0, group, sorted_slots)  # a group's tokens write the same slot
        self.group_count.zero_()
        self.group_count.scatter_add_(0, group, torch.ones_like(sorted_slots))
        torch.cumsum(self.group_count[:-1], 0, dtype=torch.int32, out=self.group_start[1:])


# Read once, as Triton itself does at import: this sits on every launch's path.
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _by_rows(tokens: int) -> bool:
    """Decode: one program per token (no grouping); prefill: tokens grouped by slot."""
    return tokens <= DECODE_MAX_TOKENS


def _shrink_tiles(tokens: int) -> dict:
    if _INTERPRETING:  # small tiles: several m tiles, k steps and rank blocks on test shapes
        return dict(BLOCK_R=16, BLOCK_K=16) | ({} if _by_rows(tokens) else dict(BLOCK_M=16))
    if _by_rows(tokens):  # a split's whole range in one step: all its loads in flight at once
        return dict(BLOCK_R=16, BLOCK_K=SPLIT_WIDTH, num_warps=4, num_stages=1)
    return dict(BLOCK_M=64, BLOCK_R=16, BLOCK_K=128, num_warps=4, num_stages=3)


def _expand_tiles(tokens: int) -> dict:
    if _INTERPRETING:
        return dict(BLOCK_N=16, BLOCK_K=16) | ({} if _by_rows(tokens) else dict(BLOCK_M=16))
    if _by_rows(tokens):  # 16 KB of B per program at rank 16
        return dict(BLOCK_N=512, BLOCK_K=16, num_warps=4, num_stages=1)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=16, num_warps=4, num_stages=3)


def _dot_f32(dtype: torch.dtype) -> bool:
    """Dot in float32 (IEEE, not TF32) for float32 data, and under the interpreter, whose
    bfloat16 ``tl.dot`` multiplies bit patterns (triton-lang/triton#11584). Products of 16-bit
    floats are exact in float32, so this matches the tensor-core dot with float32 accumulation."""
    return dtype == torch.float32 or _INTERPRETING


@triton.jit
def _dot_acc(a, b, acc, DOT_F32: tl.constexpr):
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _group_tokens(order_ptr, group_start_ptr, g, m0, count, BLOCK_M: tl.constexpr):
    """Token indices (int64) of rows ``m0 .. m0 + BLOCK_M`` of group ``g``, and their mask."""
    offs = m0 + tl.arange(0, BLOCK_M)
    mask = offs < count
    start = tl.load(group_start_ptr + g)
    tokens = tl.load(order_ptr + start + offs, mask=mask, other=0)
    return tokens.to(tl.int64), mask


@triton.jit
def _split_range(K, p, SPLITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Range ``p`` of ``SPLITS`` ranges of whole BLOCK_K steps over K (fixed tiles: fixed ranges);
    ranges past K are empty."""
    k_len = tl.cdiv(tl.cdiv(K, SPLITS), BLOCK_K) * BLOCK_K
    k_begin = p * k_len
    return k_begin, tl.minimum(k_begin + k_len, K)


@triton.jit
def _slice_tile(pid_n, OFF0, OFF1, OFF2, OFF3, BLOCK_N: tl.constexpr):
    """(slice, its columns, their mask) of n tile ``pid_n``: each slice has its own n tiles, in
    slice order, so a tile reads one slice's h."""
    end0 = (OFF1 - OFF0 + BLOCK_N - 1) // BLOCK_N
    end1 = end0 + (OFF2 - OFF1 + BLOCK_N - 1) // BLOCK_N
    s = (pid_n >= end0).to(tl.int32) + (pid_n >= end1).to(tl.int32)
    lo = tl.where(s == 0, OFF0, tl.where(s == 1, OFF1, OFF2))
    hi = tl.where(s == 0, OFF1, tl.where(s == 1, OFF2, OFF3))
    first = tl.where(s == 0, 0, tl.where(s == 1, end0, end1))
    offs_n = lo + (pid_n - first) * BLOCK_N + tl.arange(0, BLOCK_N)
    return s, offs_n, offs_n < hi


@triton.jit
def _shrink_rows_kernel(
    x_ptr,
    a_ptr,
    ranks_ptr,
    slots_ptr,
    buf_ptr,
    K,
    stride_xt,
    stride_xk,
    stride_as,
    stride_ai,
    stride_ar,
    stride_ak,
    stride_bp,
    stride_bi,
    stride_bt,
    stride_br,
    SPLITS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    """One token, slice and split per program: a matrix-vector product (no tensor-core tile of
    16 rows of which one is used). PDL: A is loaded before waiting on the kernel that wrote x."""
    if PDL:  # expand may start loading its B while this kernel runs
        tl.extra.cuda.gdc_launch_dependents()
    pid_sp = tl.program_id(0)  # slice x split, split fastest: neighbours read neighbouring A
    t = tl.program_id(1).to(tl.int64)
    slot = tl.load(slots_ptr + t)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slot)
    s = pid_sp // SPLITS
    p = pid_sp % SPLITS
    k_begin, k_end = _split_range(K, p, SPLITS, BLOCK_K)
    a_base = a_ptr + slot.to(tl.int64) * stride_as + s * stride_ai
    out = buf_ptr + p * stride_bp + s * stride_bi + t * stride_bt
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_end
            at = tl.load(
                a_base + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                mask=r_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            if PDL:  # x is the previous kernel's output (later calls return at once)
                tl.extra.cuda.gdc_wait()
            xk = tl.load(x_ptr + t * stride_xt + offs_k * stride_xk, mask=k_mask, other=0.0)
            acc += tl.sum(at.to(tl.float32) * xk.to(tl.float32)[None, :], axis=1)
        tl.store(out + offs_r * stride_br, acc, mask=r_mask)


@triton.jit
def _expand_rows_kernel(
    buf_ptr,
    b_ptr,
    ranks_ptr,
    slots_ptr,
    y_ptr,
    stride_bp,
    stride_bi,
    stride_bt,
    stride_br,
    stride_ws,
    stride_wn,
    stride_wr,
    stride_yt,
    stride_yn,
    OFF0: tl.constexpr,
    OFF1: tl.constexpr,
    OFF2: tl.constexpr,
    OFF3: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    """One token and n tile per program: a matrix-vector product. PDL: the first block of B
    (all of it up to rank BLOCK_K) is loaded before waiting on shrink, whose partials and the
    GEMM's y are read after."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    pid_n = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    slot = tl.load(slots_ptr + t)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slot)
    if rank <= 0:
        return
    s, offs_n, n_mask = _slice_tile(pid_n, OFF0, OFF1, OFF2, OFF3, BLOCK_N)
    b_rows = b_ptr + slot.to(tl.int64) * stride_ws + offs_n[:, None] * stride_wn
    h_row = buf_ptr + s * stride_bi + t * stride_bt
    y_row = y_ptr + t * stride_yt + offs_n * stride_yn
    w = _b_block(b_rows, stride_wr, n_mask, 0, rank, BLOCK_K)
    if PDL:
        tl.extra.cuda.gdc_wait()
    y = tl.load(y_row, mask=n_mask, other=0.0)
    acc = _rank_block(h_row, w, 0, rank, stride_bp, stride_br, SPLITS, BLOCK_K)
    for k0 in range(BLOCK_K, rank, BLOCK_K):
        w = _b_block(b_rows, stride_wr, n_mask, k0, rank, BLOCK_K)
        acc += _rank_block(h_row, w, k0, rank, stride_bp, stride_br, SPLITS, BLOCK_K)
    tl.store(y_row, (y.to(tl.float32) + acc).to(y.dtype), mask=n_mask)


@triton.jit
def _b_block(b_rows, stride_wr, n_mask, k0, rank, BLOCK_K: tl.constexpr):
    """B's rank rows k0 .. k0 + BLOCK_K of an n tile, (BLOCK_N, BLOCK_K)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_mask = offs_k < rank
    return tl.load(
        b_rows + offs_k[None, :] * stride_wr, mask=n_mask[:, None] & k_mask[None, :], other=0.0
    )


@triton.jit
def _rank_block(
    h_row, w, k0, rank, stride_bp, stride_br, SPLITS: tl.constexpr, BLOCK_K: tl.constexpr
):
    """w @ h over rank rows k0 .. k0 + BLOCK_K, h being shrink's partials summed in split order."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_mask = offs_k < rank
    h = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for p in tl.static_range(SPLITS):  # shrink's partials, always summed in this order
        h += tl.load(h_row + p * stride_bp + offs_k * stride_br, mask=k_mask, other=0.0)
    h = h.to(w.dtype).to(tl.float32)  # as the tile kernel feeds the dot
    return tl.sum(w.to(tl.float32) * h[None, :], axis=1)


@triton.jit
def _shrink_kernel(
    x_ptr,
    a_ptr,
    ranks_ptr,
    order_ptr,
    group_slot_ptr,
    group_start_ptr,
    group_count_ptr,
    buf_ptr,
    K,
    stride_xt,
    stride_xk,
    stride_as,
    stride_ai,
    stride_ar,
    stride_ak,
    stride_bp,
    stride_bi,
    stride_bt,
    stride_br,
    SPLITS: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_sp = tl.program_id(0)  # slice x split, split fastest: neighbours read neighbouring A
    pid_m = tl.program_id(1)
    g = tl.program_id(2)
    slot = tl.load(group_slot_ptr + g)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slot)
    count = tl.load(group_count_ptr + g)
    m0 = pid_m * BLOCK_M
    if (m0 >= count) | (rank <= 0):
        return
    tokens, m_mask = _group_tokens(order_ptr, group_start_ptr, g, m0, count, BLOCK_M)
    s = pid_sp // SPLITS
    p = pid_sp % SPLITS
    k_begin, k_end = _split_range(K, p, SPLITS, BLOCK_K)
    a_base = a_ptr + slot.to(tl.int64) * stride_as + s * stride_ai
    x_rows = x_ptr + tokens[:, None] * stride_xt
    out_rows = buf_ptr + p * stride_bp + s * stride_bi + tokens[:, None] * stride_bt
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):  # no steps past K: an empty range stores 0
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_end
            xt = tl.load(
                x_rows + offs_k[None, :] * stride_xk,
                mask=m_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            at = tl.load(
                a_base + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                mask=r_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            acc = _dot_acc(xt, tl.trans(at), acc, DOT_F32)
        tl.store(
            out_rows + offs_r[None, :] * stride_br, acc, mask=m_mask[:, None] & r_mask[None, :]
        )


@triton.jit
def _expand_kernel(
    buf_ptr,
    b_ptr,
    ranks_ptr,
    order_ptr,
    group_slot_ptr,
    group_start_ptr,
    group_count_ptr,
    y_ptr,
    stride_bp,
    stride_bi,
    stride_bt,
    stride_br,
    stride_ws,
    stride_wn,
    stride_wr,
    stride_yt,
    stride_yn,
    OFF0: tl.constexpr,  # slice s owns columns [OFF_s, OFF_s+1); unused bounds repeat the last
    OFF1: tl.constexpr,
    OFF2: tl.constexpr,
    OFF3: tl.constexpr,
    SPLITS: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    g = tl.program_id(2)
    slot = tl.load(group_slot_ptr + g)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slot)
    count = tl.load(group_count_ptr + g)
    m0 = pid_m * BLOCK_M
    if (m0 >= count) | (rank <= 0):
        return
    tokens, m_mask = _group_tokens(order_ptr, group_start_ptr, g, m0, count, BLOCK_M)
    s, offs_n, n_mask = _slice_tile(pid_n, OFF0, OFF1, OFF2, OFF3, BLOCK_N)
    y_tile = y_ptr + tokens[:, None] * stride_yt + offs_n[None, :] * stride_yn
    mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_tile, mask=mask, other=0.0)  # first: its latency overlaps B's
    b_rows = b_ptr + slot.to(tl.int64) * stride_ws + offs_n[:, None] * stride_wn
    h_rows = buf_ptr + s * stride_bi + tokens[:, None] * stride_bt
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, rank, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < rank
        w = tl.load(
            b_rows + offs_k[None, :] * stride_wr, mask=n_mask[:, None] & k_mask[None, :], other=0.0
        )
        h = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for p in tl.static_range(SPLITS):  # shrink's partials, always summed in this order
            h += tl.load(
                h_rows + p * stride_bp + offs_k[None, :] * stride_br,
                mask=m_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
        acc = _dot_acc(h.to(w.dtype), tl.trans(w), acc, DOT_F32)
    tl.store(y_tile, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)


def _ready_meta(
    meta: LoraKernelMeta | None, token_slots: torch.Tensor, num_slots: int
) -> LoraKernelMeta:
    _check_meta(meta, token_slots.shape[0])
    if meta is None:
        meta = LoraKernelMeta(token_slots.shape[0], num_slots, token_slots.device)
        meta.update(token_slots)
    return meta


def _check_meta(meta: LoraKernelMeta | None, t: int) -> None:
    if meta is not None and meta.num_tokens != t:
        raise ValueError(f"meta was updated for {meta.num_tokens} tokens, this call has {t}")


def _num_groups(t: int, num_slots: int) -> int:
    return min(t, num_slots + 1)  # distinct slots among t tokens, -1 included


def _check_slots(token_slots: torch.Tensor, t: int) -> None:
    if token_slots.dtype != torch.int32 or token_slots.shape != (t,):
        raise ValueError(
            f"token_slots must be int32 of shape ({t},), got {token_slots.dtype} "
            f"{tuple(token_slots.shape)}"
        )


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    slot_ranks: torch.Tensor,
    token_slots: torch.Tensor,
    buf: torch.Tensor,
    meta: LoraKernelMeta | None = None,
) -> None:
    """``buf[p, s, t, :r]`` = range ``p`` of ``x[t] @ lora_a[slot_t, s, :r].T`` (float32) for
    every token with a slot, ``buf.shape[0]`` ranges (see the module docstring).

    ``meta``: a ``LoraKernelMeta`` updated with ``token_slots`` (built here when None, which is
    fine outside CUDA graphs).
    """
    t, k = x.shape
    num_slots, num_slices, max_rank, k_a = lora_a.shape
    if (
        k_a != k
        or buf.dim() != 4
        or buf.shape[0] < 1
        or buf.shape[1:] != (num_slices, t, max_rank)
        or buf.dtype != torch.float32
    ):
        raise ValueError(
            f"shapes: x {tuple(x.shape)}, lora_a {tuple(lora_a.shape)}, buf {tuple(buf.shape)} "
            f"{buf.dtype} (buf must be float32 (splits, slices, T, max_rank))"
        )
    _check_slots(token_slots, t)
    if num_slices > MAX_SLICES or max_rank > 128 or lora_a.dtype != x.dtype:
        raise ValueError(f"at most {MAX_SLICES} slices, rank 128, lora_a in x's dtype")
    if t == 0:
        return
    splits = buf.shape[0]
    tiles = _shrink_tiles(t)
    strides = (*x.stride(), *lora_a.stride(), *buf.stride())
    if _by_rows(t):
        _check_meta(meta, t)
        grid = (num_slices * splits, t)
        _shrink_rows_kernel[grid](
            x, lora_a, slot_ranks, token_slots, buf, k, *strides, SPLITS=splits,
            **tiles, **launch_options(x.device),
        )  # fmt: skip
        return
    meta = _ready_meta(meta, token_slots, num_slots)
    grid = (num_slices * splits, triton.cdiv(t, tiles["BLOCK_M"]), _num_groups(t, num_slots))
    _shrink_kernel[grid](
        x,
        lora_a,
        slot_ranks,
        meta.order,
        meta.group_slot,
        meta.group_start,
        meta.group_count,
        buf,
        k,
        *strides,
        SPLITS=splits,
        DOT_F32=_dot_f32(x.dtype),
        **tiles,
    )


def lora_expand(
    buf: torch.Tensor,
    lora_b: torch.Tensor,
    slot_ranks: torch.Tensor,
    token_slots: torch.Tensor,
    y: torch.Tensor,
    slice_offsets: Sequence[int],
    meta: LoraKernelMeta | None = None,
) -> None:
    """``y[t, slice s] += (sum over p of buf[p, s, t, :r]) @ lora_b[slot_t, :r, slice s]``, in
    place, for every token with a slot; ``y`` may be a strided view. ``meta`` as for
    ``lora_shrink``."""
    if buf.dim() != 4:
        raise ValueError(f"buf must be (splits, slices, T, max_rank), got {tuple(buf.shape)}")
    splits, num_slices, t, max_rank = buf.shape
    num_slots, max_rank_b, out_total = lora_b.shape
    offsets = tuple(int(o) for o in slice_offsets)
    if (
        splits < 1
        or len(offsets) != num_slices + 1
        or num_slices > MAX_SLICES
        or list(offsets) != sorted(offsets)
        or offsets[0] < 0
        or offsets[-1] > min(out_total, y.shape[1])
        or max_rank_b != max_rank
        or max_rank > 128
        or y.shape[0] != t
        or buf.dtype != torch.float32
        or lora_b.dtype != y.dtype
    ):
        raise ValueError(
            f"shapes: buf {tuple(buf.shape)} {buf.dtype}, lora_b {tuple(lora_b.shape)} "
            f"{lora_b.dtype}, y {tuple(y.shape)} {y.dtype}, slice_offsets {offsets}"
        )
    _check_slots(token_slots, t)
    if t == 0 or offsets[-1] == offsets[0]:
        return
    bounds = offsets + (offsets[-1],) * (MAX_SLICES + 1 - len(offsets))
    tiles = _expand_tiles(t)
    n_tiles = sum(triton.cdiv(hi - lo, tiles["BLOCK_N"]) for lo, hi in itertools.pairwise(bounds))
    slot_stride, rank_stride, col_stride = lora_b.stride()
    strides = (*buf.stride(), slot_stride, col_stride, rank_stride, *y.stride())
    if _by_rows(t):
        _check_meta(meta, t)
        _expand_rows_kernel[(n_tiles, t)](
            buf, lora_b, slot_ranks, token_slots, y, *strides, *bounds, SPLITS=splits,
            **tiles, **launch_options(y.device),
        )  # fmt: skip
        return
    meta = _ready_meta(meta, token_slots, num_slots)
    grid = (n_tiles, triton.cdiv(t, tiles["BLOCK_M"]), _num_groups(t, num_slots))
    _expand_kernel[grid](
        buf,
        lora_b,
        slot_ranks,
        meta.order,
        meta.group_slot,
        meta.group_start,
        meta.group_count,
        y,
        *strides,
        *bounds,
        SPLITS=splits,
        DOT_F32=_dot_f32(y.dtype),
        **tiles,
    )


def lora_apply(
    x: torch.Tensor,
    y: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slot_ranks: torch.Tensor,
    token_slots: torch.Tensor,
    slice_offsets: Sequence[int],
    buf: torch.Tensor,
    meta: LoraKernelMeta | None = None,
    *,
    use_triton: bool,
) -> None:
    """``y += LoRA(x)`` for a projection group: shrink into ``buf``, expand into ``y``."""
    if use_triton:
        if not _by_rows(x.shape[0]):  # one grouping for both launches
            meta = _ready_meta(meta, token_slots, lora_a.shape[0])
        lora_shrink(x, lora_a, slot_ranks, token_slots, buf, meta)
        lora_expand(buf, lora_b, slot_ranks, token_slots, y, slice_offsets, meta)
    else:
        lora_shrink_torch(x, lora_a, slot_ranks, token_slots, buf)
        lora_expand_torch(buf, lora_b, slot_ranks, token_slots, y, slice_offsets)
