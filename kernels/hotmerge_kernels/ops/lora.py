"""Multi-LoRA apply as two Triton kernels per projection group: shrink, then expand. This module
holds the contract, the shapes, the tiles and the launches; the kernels are in ``lora_triton``,
their torch twins (``lora_shrink``, ``lora_expand``, ``lora_apply``) in ``reference``.

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
features, which gives the GPU hundreds of programs even at batch 1; a prefill splits too, into
at most ``PREFILL_MAX_SPLITS`` ranges: unsplit, each of its few m tiles (16 for 1024 tokens)
would walk all of ``in`` in one program (14336 features for down).
``lora_workspace`` allocates a buffer for every group of a forward; each group uses its leading
``lora_splits`` splits and slices.

Two kernel pairs, chosen by T:

- Decode (T <= ``DECODE_MAX_TOKENS``): one program per token and (slice, split) for shrink, per
  token and n tile for expand, reading the token's slot directly: matrix-vector products in
  float32 (a batch's rows mostly have distinct adapters; rows that share one read it again from
  L2). Grids: (slices x splits, T) and (n tiles, T). On Hopper both are launched as programmatic
  dependents: each reads its adapter weights before ``gdc_wait`` and what the previous kernel
  wrote (x; the partials and y) after, so expand's B loads overlap shrink.
- Prefill: tokens grouped by slot (``LoraKernelMeta``: a stable sort of the slots, each run's
  start, length and slot, and the list of m tiles: a group's tokens in tiles of
  ``PREFILL_BLOCK_M``, groups of slot -1 left out), each tile a tensor-core tile of one group's
  tokens, so tokens that share an adapter share its weight reads. Grids: (slices x splits, P)
  and (n tiles, P); the P programs of a column walk the tile list (its length read on the
  device), so no program is launched for a (group, tile) pair that does not exist: a grid of
  (m tiles x every possible group) was mostly programs that exited at once, 98% of them for
  eight 128-token prompts in a pool of 48 slots.

Expand's n tiles never straddle two slices. Tile sizes are fixed per path, not autotuned: the
same tiles and the same sums in every process. Nothing syncs with the host and the launches
allocate nothing (``meta.update``'s temporaries come from the graph's pool when captured), so the
calls can be captured in a CUDA graph once compiled. The prefill launches build a ``meta`` when
none is passed; decode launches need none.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import triton

from hotmerge_kernels.backend import INTERPRETING
from hotmerge_kernels.ops import lora_triton
from hotmerge_kernels.ops.pdl import launch_options

__all__ = [
    "LoraKernelMeta",
    "lora_apply",
    "lora_expand",
    "lora_shrink",
    "lora_splits",
    "lora_workspace",
]

MAX_SLICES = 3
DECODE_MAX_TOKENS = 64  # up to this many tokens: decode tiles and split in_features
SPLIT_WIDTH = 512  # in_features per shrink split at decode (16 KB of A per rank-16 program)
PREFILL_MAX_SPLITS = 8  # prefill expand unrolls its sum over the splits: keep it short
# Tokens per prefill tile (the meta's tile list): 16, since a mixed step's decode rows make
# one-token groups, and a small tile leaves a program few registers, so more run at once. H100
# sweep (gpu-checks-H100-2026-12-07-e), gate_up expand against 64-row tiles with n tiles of 128
# and 8 extra programs: 31 one-token groups and a prompt 180 -> 55 us, 8 groups 60 -> 32 us,
# eight 128-token prompts 125 -> 102 us; the extra programs took shrink there 23 -> 14 us (down).
PREFILL_BLOCK_M = 16
EXTRA_TILE_PROGRAMS = 64  # programs a grid column has beyond one group's tiles


def lora_splits(in_features: int, tokens: int) -> int:
    """Ranges shrink splits ``in_features`` into for ``tokens`` tokens (shapes only)."""
    splits = triton.cdiv(in_features, SPLIT_WIDTH)
    return splits if tokens <= DECODE_MAX_TOKENS else min(splits, PREFILL_MAX_SPLITS)


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

    ``update(token_slots)`` runs device ops only (sort, cumsum, scatter, searchsorted), so it can
    be captured in the same CUDA graph as the kernels; call it once per step, before every
    layer's ``lora_shrink`` / ``lora_expand`` with those ``token_slots``. Groups are numbered in
    slot order; group entries past the last group hold slot -1. The tile list: tile ``i`` of
    ``num_tiles`` is rows ``tile_m0[i] ..`` of group ``tile_group[i]``, in group order, tiles of
    ``PREFILL_BLOCK_M`` tokens, for groups with a slot only; at most ``max_tiles`` (a function of
    the shapes) entries.
    """

    def __init__(self, max_tokens: int, num_slots: int, device: torch.device | str) -> None:
        self.max_tokens = max_tokens
        self.num_slots = num_slots
        self.num_tokens = 0  # T of the last update (a host int: the launches check it)
        self.order = torch.zeros(max_tokens, dtype=torch.int32, device=device)  # tokens by slot
        self.group_slot = torch.full((max_tokens,), -1, dtype=torch.int32, device=device)
        self.group_start = torch.zeros(max_tokens, dtype=torch.int32, device=device)
        self.group_count = torch.zeros(max_tokens, dtype=torch.int32, device=device)
        # Each group's tiles are at most floor(count / M) + 1, and there are at most
        # min(T, slots + 1) groups: the list's bound for every T up to max_tokens.
        self.max_tiles = max_tiles(max_tokens, num_slots)
        self.tile_group = torch.zeros(self.max_tiles, dtype=torch.int32, device=device)
        self.tile_m0 = torch.zeros(self.max_tiles, dtype=torch.int32, device=device)
        self.num_tiles = torch.zeros(1, dtype=torch.int32, device=device)
        self._tile_index = torch.arange(self.max_tiles, device=device)

    def update(self, token_slots: torch.Tensor) -> None:
        t = token_slots.shape[0]
        if t > self.max_tokens:
            raise ValueError(
                f"token_slots has {t} tokens, the meta was built for {self.max_tokens}"
            )
        self.num_tokens = t
        if t == 0:
            self.num_tiles.zero_()
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
        m = PREFILL_BLOCK_M
        tiles = torch.where(self.group_slot >= 0, (self.group_count + m - 1) // m, 0)
        ends = torch.cumsum(tiles, 0)  # one past each group's last tile
        self.num_tiles.copy_(ends[-1:])
        tile_group = torch.searchsorted(ends, self._tile_index, right=True)
        tile_group.clamp_(max=self.max_tokens - 1)  # entries past num_tiles: never read
        self.tile_group.copy_(tile_group)
        self.tile_m0.copy_((self._tile_index - (ends - tiles)[tile_group]) * m)


def max_tiles(tokens: int, num_slots: int) -> int:
    """The tile list's bound for ``tokens`` tokens over ``num_slots`` slots (see the meta)."""
    return tokens // PREFILL_BLOCK_M + min(tokens, num_slots + 1)


def _tile_programs(tokens: int, num_slots: int) -> int:
    """Programs of a grid column that walk the tile list: the tiles of T tokens in one group,
    plus ``EXTRA_TILE_PROGRAMS`` for the extra tiles of more groups (shapes only: the list's
    length is on the device), so a mixed step's one-token groups get a program each rather
    than a few programs walking them one after the other."""
    one_group = triton.cdiv(tokens, PREFILL_BLOCK_M)
    return min(max_tiles(tokens, num_slots), one_group + EXTRA_TILE_PROGRAMS)


def _by_rows(tokens: int) -> bool:
    """Decode: one program per token (no grouping); prefill: tokens grouped by slot."""
    return tokens <= DECODE_MAX_TOKENS


def _shrink_tiles(tokens: int) -> dict:
    if INTERPRETING:  # small tiles: several m tiles, k steps and rank blocks on test shapes
        return dict(BLOCK_R=16, BLOCK_K=16)
    if _by_rows(tokens):  # a split's whole range in one step: all its loads in flight at once
        return dict(BLOCK_R=16, BLOCK_K=SPLIT_WIDTH, num_warps=4, num_stages=1)
    return dict(BLOCK_R=16, BLOCK_K=128, num_warps=4, num_stages=3)


def _expand_tiles(tokens: int) -> dict:
    if INTERPRETING:
        return dict(BLOCK_N=16, BLOCK_K=16)
    if _by_rows(tokens):  # 16 KB of B per program at rank 16
        return dict(BLOCK_N=512, BLOCK_K=16, num_warps=4, num_stages=1)
    return dict(BLOCK_N=256, BLOCK_K=16, num_warps=4, num_stages=3)


def _dot_f32(dtype: torch.dtype) -> bool:
    """Dot in float32 (IEEE, not TF32) for float32 data, and under the interpreter, whose
    bfloat16 ``tl.dot`` multiplies bit patterns (triton-lang/triton#11584). Products of 16-bit
    floats are exact in float32, so this matches the tensor-core dot with float32 accumulation."""
    return dtype == torch.float32 or INTERPRETING


def _ready_meta(
    meta: LoraKernelMeta | None, token_slots: torch.Tensor, num_slots: int
) -> LoraKernelMeta:
    _check_meta(meta, token_slots.shape[0])
    if meta is None:
        meta = LoraKernelMeta(token_slots.shape[0], num_slots, token_slots.device)
        meta.update(token_slots)
    return meta


def _tile_list(meta: LoraKernelMeta) -> tuple[torch.Tensor, ...]:
    """The prefill kernels' view of the grouping: tokens by slot, each group's start, count and
    slot, and the tile list."""
    return (meta.order, meta.group_start, meta.group_count, meta.group_slot, meta.tile_group,
            meta.tile_m0, meta.num_tiles)  # fmt: skip


def _check_meta(meta: LoraKernelMeta | None, t: int) -> None:
    if meta is not None and meta.num_tokens != t:
        raise ValueError(f"meta was updated for {meta.num_tokens} tokens, this call has {t}")


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
        lora_triton.shrink_rows_kernel[grid](
            x, lora_a, slot_ranks, token_slots, buf, k, *strides, SPLITS=splits,
            **tiles, **launch_options(x.device),
        )  # fmt: skip
        return
    meta = _ready_meta(meta, token_slots, num_slots)
    grid = (num_slices * splits, _tile_programs(t, num_slots))
    lora_triton.shrink_kernel[grid](
        x,
        lora_a,
        slot_ranks,
        *_tile_list(meta),
        buf,
        k,
        *strides,
        SPLITS=splits,
        DOT_F32=_dot_f32(x.dtype),
        BLOCK_M=PREFILL_BLOCK_M,
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
        lora_triton.expand_rows_kernel[(n_tiles, t)](
            buf, lora_b, slot_ranks, token_slots, y, *strides, *bounds, SPLITS=splits,
            **tiles, **launch_options(y.device),
        )  # fmt: skip
        return
    meta = _ready_meta(meta, token_slots, num_slots)
    grid = (n_tiles, _tile_programs(t, num_slots))
    lora_triton.expand_kernel[grid](
        buf,
        lora_b,
        slot_ranks,
        *_tile_list(meta),
        y,
        *strides,
        *bounds,
        SPLITS=splits,
        DOT_F32=_dot_f32(y.dtype),
        BLOCK_M=PREFILL_BLOCK_M,
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
) -> None:
    """``y += LoRA(x)`` for a projection group: shrink into ``buf``, expand into ``y``."""
    if not _by_rows(x.shape[0]):  # one grouping for both launches
        meta = _ready_meta(meta, token_slots, lora_a.shape[0])
    lora_shrink(x, lora_a, slot_ranks, token_slots, buf, meta)
    lora_expand(buf, lora_b, slot_ranks, token_slots, y, slice_offsets, meta)
