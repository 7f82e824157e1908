"""Multi-LoRA apply as two Triton kernels per projection group: shrink, then expand.

The engine keeps every loaded adapter in a *slot* of a stacked pool and tags each token (decode
row or prefill token) with its slot, -1 meaning the base model only:

- ``lora_a (slots, slices, max_rank, in)``: A of each slice (q/k/v: 3, gate/up: 2, o or down: 1).
- ``lora_b (slots, out_total, max_rank)``: B with the LoRA scaling folded in; slice ``s`` owns the
  output columns ``slice_offsets[s]:slice_offsets[s + 1]``.
- ``slot_ranks (slots,) int32``: rank used by each slot (0: empty); columns past it are never read.

``lora_shrink`` writes ``buf[s, t, :r] = x[t] @ A[slot_t, s, :r].T`` into a float32
``buf (slices, T, max_rank)``; ``lora_expand`` adds ``buf[s, t, :r] @ B[slot_t, slice s, :r].T``
into ``y (T, out_total)`` in place (float32 accumulation, one read-modify-write of ``y``). Rows
of ``y`` whose slot is -1 (or an empty slot) are not touched. Other ``buf`` entries than those
defined are unspecified (zero when the chosen config splits K, untouched otherwise). Slots must
be < the pool's slot count: they are not checked on the device.

Tokens are grouped by slot (``LoraKernelMeta``: a stable sort of the slots and each run's start,
length and slot), and each program works on up to ``BLOCK_M`` tokens of one group, so prefill
tokens that share an adapter share its weight reads, and a decode batch of distinct adapters reads
each adapter once. The grid is sized from shapes only (m tiles x slices or n tiles x
``min(T, slots + 1)`` groups); programs of absent groups or past a group's length exit at once.
Nothing syncs with the host and the launches allocate nothing (``meta.update``'s temporaries come
from the graph's pool when captured), so a call can be captured in a CUDA graph once the
autotuner has seen its shape bucket (key: next power of two of T, sizes, dtypes); the engine warms
every shape before capture. Without a ``meta`` argument the launches build one (fine eagerly).

Shrink splits ``in_features`` across programs (``SPLIT_K``, atomics into the zeroed buffer) so
that a decode batch fills the GPU; expand tiles ``out_total`` across programs (one tile may
straddle two slices: each slice's B rows are masked to its columns).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
import triton.testing

from .lora_apply_reference import lora_expand_torch, lora_shrink_torch

__all__ = [
    "LoraKernelMeta",
    "lora_apply",
    "lora_expand",
    "lora_expand_torch",
    "lora_shrink",
    "lora_shrink_torch",
]

MAX_SLICES = 3
DECODE_MAX_TOKENS = 64  # up to this many tokens, the decode tile configs are tried


class LoraKernelMeta:
    """Tokens grouped by adapter slot, in fixed device buffers (built once, updated every step).

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


def _zero_buf(nargs: dict) -> None:
    nargs["buf_ptr"].zero_()  # split-K programs add their partial sums into it


def _t_bucket(t: int) -> int:
    return triton.next_power_of_2(t)


def _interpreting() -> bool:
    return _INTERPRETING


# Read once, as Triton itself does at import: this sits on every launch's path.
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _shrink_configs() -> list[triton.Config]:
    if _interpreting():  # one small config: several m tiles, k steps and splits on test shapes
        return [
            triton.Config(
                {"BLOCK_M": 16, "BLOCK_R": 16, "BLOCK_K": 16, "SPLIT_K": 2}, pre_hook=_zero_buf
            )
        ]
    # Decode buckets choose among a few split-K tilings (the engine warms every bucket before
    # capture, so a short list keeps start-up in seconds); prefill takes one large tile.
    # No split of K at decode: split-K adds its partial sums with atomics, in no fixed order,
    # so a row's LoRA output (and a greedy token) could change from one run to the next.
    decode = [
        triton.Config(
            {"BLOCK_M": 16, "BLOCK_R": 16, "BLOCK_K": k, "SPLIT_K": 1},
            num_warps=w,
            num_stages=3,
        )
        for k, w in itertools.product((128, 256), (4, 8))
    ]
    prefill = [
        triton.Config(
            {"BLOCK_M": 64, "BLOCK_R": 16, "BLOCK_K": 128, "SPLIT_K": 1}, num_warps=4, num_stages=3
        )
    ]
    return decode + prefill


def _expand_configs() -> list[triton.Config]:
    if _interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})]
    decode = [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": n, "BLOCK_K": 16}, num_warps=4, num_stages=2)
        for n in (64, 128)
    ]
    prefill = [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 16}, num_warps=4, num_stages=3)
    ]
    return decode + prefill


def _tuning_bench(kernel_call, quantiles):
    """Autotuning timer: the kernels take microseconds, so 25 ms of repeats is plenty."""
    return triton.testing.do_bench(kernel_call, warmup=2, rep=10, quantiles=quantiles)


def _prune_by_tokens(configs: list[triton.Config], nargs: dict, **kwargs) -> list[triton.Config]:
    """Decode buckets try 16-row tiles, prefill buckets the larger ones."""
    decode = nargs["T_BUCKET"] <= DECODE_MAX_TOKENS
    kept = [c for c in configs if (c.kwargs["BLOCK_M"] == 16) == decode]
    return kept or configs


def _dot_f32(dtype: torch.dtype) -> bool:
    """Dot in float32 (IEEE, not TF32) for float32 data, and under the interpreter, whose
    bfloat16 ``tl.dot`` multiplies bit patterns (triton-lang/triton#11584). Products of 16-bit
    floats are exact in float32, so this matches the tensor-core dot with float32 accumulation."""
    return dtype == torch.float32 or _interpreting()


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


@triton.autotune(
    configs=_shrink_configs(),
    key=["T_BUCKET", "K", "MAX_RANK", "NUM_SLICES"],
    prune_configs_by={"early_config_prune": _prune_by_tokens},
    do_bench=_tuning_bench,
)
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
    T_BUCKET,  # autotune key only
    MAX_RANK,  # autotune key only
    stride_xt,
    stride_xk,
    stride_as,
    stride_ai,
    stride_ar,
    stride_ak,
    stride_bi,
    stride_bt,
    stride_br,
    NUM_SLICES: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_sk = tl.program_id(1)
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
    s = pid_sk // SPLIT_K
    k_len = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K  # in_features of one split
    k_begin = (pid_sk % SPLIT_K) * k_len
    k_end = tl.minimum(k_begin + k_len, K)
    a_base = a_ptr + slot.to(tl.int64) * stride_as + s * stride_ai
    x_rows = x_ptr + tokens[:, None] * stride_xt
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
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
        out = buf_ptr + s * stride_bi + tokens[:, None] * stride_bt + offs_r[None, :] * stride_br
        mask = m_mask[:, None] & r_mask[None, :]
        if SPLIT_K == 1:
            tl.store(out, acc, mask=mask)
        else:
            tl.atomic_add(out, acc, mask=mask, sem="relaxed")


@triton.jit
def _slice_bounds(s: tl.constexpr, OFF0, OFF1, OFF2, OFF3):
    if s == 0:
        return OFF0, OFF1
    elif s == 1:
        return OFF1, OFF2
    else:
        return OFF2, OFF3


@triton.autotune(
    configs=_expand_configs(),
    key=["T_BUCKET", "OFF0", "OFF3", "MAX_RANK", "NUM_SLICES"],
    prune_configs_by={"early_config_prune": _prune_by_tokens},
    restore_value=["y_ptr"],  # benchmarking adds into y many times
    do_bench=_tuning_bench,
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
    T_BUCKET,  # autotune key only
    MAX_RANK,  # autotune key only
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
    NUM_SLICES: tl.constexpr,
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
    n0 = OFF0 + pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    b_base = b_ptr + slot.to(tl.int64) * stride_ws + offs_n[:, None] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(NUM_SLICES):
        lo, hi = _slice_bounds(s, OFF0, OFF1, OFF2, OFF3)
        if (n0 < hi) & (n0 + BLOCK_N > lo):  # this tile overlaps slice s
            n_mask = (offs_n >= lo) & (offs_n < hi)
            h_rows = buf_ptr + s * stride_bi + tokens[:, None] * stride_bt
            for k0 in range(0, rank, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < rank
                h = tl.load(
                    h_rows + offs_k[None, :] * stride_br,
                    mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                w = tl.load(
                    b_base + offs_k[None, :] * stride_wr,
                    mask=n_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                acc = _dot_acc(h.to(w.dtype), tl.trans(w), acc, DOT_F32)
    y_tile = y_ptr + tokens[:, None] * stride_yt + offs_n[None, :] * stride_yn
    mask = m_mask[:, None] & (offs_n < OFF3)[None, :]
    y = tl.load(y_tile, mask=mask, other=0.0)
    tl.store(y_tile, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)


def _ready_meta(
    meta: LoraKernelMeta | None, token_slots: torch.Tensor, num_slots: int
) -> LoraKernelMeta:
    t = token_slots.shape[0]
    if meta is None:
        meta = LoraKernelMeta(t, num_slots, token_slots.device)
        meta.update(token_slots)
    elif meta.num_tokens != t:
        raise ValueError(f"meta was updated for {meta.num_tokens} tokens, this call has {t}")
    return meta


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
    """``buf[s, t, :r] = x[t] @ lora_a[slot_t, s, :r].T`` (float32) for every token with a slot.

    ``meta``: a ``LoraKernelMeta`` updated with ``token_slots`` (built here when None, which is
    fine outside CUDA graphs).
    """
    t, k = x.shape
    num_slots, num_slices, max_rank, k_a = lora_a.shape
    if k_a != k or buf.shape != (num_slices, t, max_rank) or buf.dtype != torch.float32:
        raise ValueError(
            f"shapes: x {tuple(x.shape)}, lora_a {tuple(lora_a.shape)}, buf {tuple(buf.shape)} "
            f"{buf.dtype} (buf must be float32 (slices, T, max_rank))"
        )
    _check_slots(token_slots, t)
    if num_slices > MAX_SLICES or max_rank > 128 or lora_a.dtype != x.dtype:
        raise ValueError(f"at most {MAX_SLICES} slices, rank 128, lora_a in x's dtype")
    if t == 0:
        return
    meta = _ready_meta(meta, token_slots, num_slots)
    groups = _num_groups(t, num_slots)

    def grid(cfg):
        return (triton.cdiv(t, cfg["BLOCK_M"]), num_slices * cfg["SPLIT_K"], groups)

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
        _t_bucket(t),
        max_rank,
        *x.stride(),
        *lora_a.stride(),
        *buf.stride(),
        NUM_SLICES=num_slices,
        DOT_F32=_dot_f32(x.dtype),
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
    """``y[t, slice s] += buf[s, t, :r] @ lora_b[slot_t, slice s, :r].T``, in place, for every
    token with a slot; ``y`` may be a strided view. ``meta`` as for ``lora_shrink``."""
    num_slices, t, max_rank = buf.shape
    num_slots, out_total, max_rank_b = lora_b.shape
    offsets = tuple(int(o) for o in slice_offsets)
    if (
        len(offsets) != num_slices + 1
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
    meta = _ready_meta(meta, token_slots, num_slots)
    bounds = offsets + (offsets[-1],) * (MAX_SLICES + 1 - len(offsets))
    groups = _num_groups(t, num_slots)

    def grid(cfg):
        width = offsets[-1] - offsets[0]
        return (triton.cdiv(width, cfg["BLOCK_N"]), triton.cdiv(t, cfg["BLOCK_M"]), groups)

    _expand_kernel[grid](
        buf,
        lora_b,
        slot_ranks,
        meta.order,
        meta.group_slot,
        meta.group_start,
        meta.group_count,
        y,
        _t_bucket(t),
        max_rank,
        *buf.stride(),
        *lora_b.stride(),
        *y.stride(),
        *bounds,
        NUM_SLICES=num_slices,
        DOT_F32=_dot_f32(y.dtype),
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
        meta = _ready_meta(meta, token_slots, lora_a.shape[0])
        lora_shrink(x, lora_a, slot_ranks, token_slots, buf, meta)
        lora_expand(buf, lora_b, slot_ranks, token_slots, y, slice_offsets, meta)
    else:
        lora_shrink_torch(x, lora_a, slot_ranks, token_slots, buf)
        lora_expand_torch(buf, lora_b, slot_ranks, token_slots, y, slice_offsets)
