"""Triton kernels of the multi-LoRA apply; ``lora`` launches them (shapes, checks, tiles, the
contract in its docstring) and ``reference`` holds their torch twins.

- ``shrink_rows_kernel`` / ``expand_rows_kernel``: decode, one program per token and (slice,
  split) / n tile, matrix-vector products; programmatic dependents on Hopper (``pdl``).
- ``shrink_kernel`` / ``expand_kernel``: tokens grouped by slot (``LoraKernelMeta``), the
  programs of a grid column walking the meta's tile list, each tile a tensor-core tile of one
  group's tokens.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["expand_kernel", "expand_rows_kernel", "shrink_kernel", "shrink_rows_kernel"]


@triton.jit
def _dot_acc(a, b, acc, DOT_F32: tl.constexpr):
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _tile_tokens(
    order_ptr,
    group_start_ptr,
    group_count_ptr,
    group_slot_ptr,
    tile_group_ptr,
    tile_m0_ptr,
    i,
    BLOCK_M: tl.constexpr,
):
    """Tile ``i`` of the list: its slot, its token indices (int64) and their mask."""
    g = tl.load(tile_group_ptr + i)
    offs = tl.load(tile_m0_ptr + i) + tl.arange(0, BLOCK_M)
    mask = offs < tl.load(group_count_ptr + g)
    start = tl.load(group_start_ptr + g)
    tokens = tl.load(order_ptr + start + offs, mask=mask, other=0)
    return tl.load(group_slot_ptr + g), tokens.to(tl.int64), mask


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
def shrink_rows_kernel(
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
def expand_rows_kernel(
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
def shrink_kernel(
    x_ptr,
    a_ptr,
    ranks_ptr,
    order_ptr,
    group_start_ptr,
    group_count_ptr,
    group_slot_ptr,
    tile_group_ptr,
    tile_m0_ptr,
    num_tiles_ptr,
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
    s = pid_sp // SPLITS
    p = pid_sp % SPLITS
    k_begin, k_end = _split_range(K, p, SPLITS, BLOCK_K)
    for i in range(tl.program_id(1), tl.load(num_tiles_ptr), tl.num_programs(1)):
        slot, tokens, m_mask = _tile_tokens(
            order_ptr, group_start_ptr, group_count_ptr, group_slot_ptr, tile_group_ptr,
            tile_m0_ptr, i, BLOCK_M,
        )  # fmt: skip
        rank = tl.load(ranks_ptr + slot)  # the list has tiles of slots >= 0 only
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
def expand_kernel(
    buf_ptr,
    b_ptr,
    ranks_ptr,
    order_ptr,
    group_start_ptr,
    group_count_ptr,
    group_slot_ptr,
    tile_group_ptr,
    tile_m0_ptr,
    num_tiles_ptr,
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
    s, offs_n, n_mask = _slice_tile(tl.program_id(0), OFF0, OFF1, OFF2, OFF3, BLOCK_N)
    for i in range(tl.program_id(1), tl.load(num_tiles_ptr), tl.num_programs(1)):
        slot, tokens, m_mask = _tile_tokens(
            order_ptr, group_start_ptr, group_count_ptr, group_slot_ptr, tile_group_ptr,
            tile_m0_ptr, i, BLOCK_M,
        )  # fmt: skip
        rank = tl.load(ranks_ptr + slot)  # the list has tiles of slots >= 0 only
        if rank > 0:
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
                    b_rows + offs_k[None, :] * stride_wr,
                    mask=n_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                h = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
                for p in tl.static_range(SPLITS):  # shrink's partials, always in this order
                    h += tl.load(
                        h_rows + p * stride_bp + offs_k[None, :] * stride_br,
                        mask=m_mask[:, None] & k_mask[None, :],
                        other=0.0,
                    )
                acc = _dot_acc(h.to(w.dtype), tl.trans(w), acc, DOT_F32)
            tl.store(y_tile, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)
