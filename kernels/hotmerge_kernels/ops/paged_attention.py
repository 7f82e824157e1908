"""Paged decode attention: one query token per row against that row's blocks of a paged KV cache.

Contract (the engine owns the tensors):

- ``k_cache``, ``v_cache``: ``(num_blocks, block_size, num_kv_heads, head_dim)``, model dtype.
- ``block_tables``: ``(B, max_blocks_per_seq)`` int32; row b's logical block i is physical block
  ``block_tables[b, i]``. Entries past a row's length are never read.
- ``seq_lens``: ``(B,)`` int32, tokens of row b in the cache including the current one; 0 marks a
  padding row, whose output is zeros.
- ``q``, ``out``: ``(B, num_heads, head_dim)``; num_heads is a multiple of num_kv_heads (GQA).
- ``sliding_window``: 0 for none, else the query at position p = seq_len - 1 attends keys j with
  p - j < window (transformers' ``kv_idx > q_idx - sliding_window``).

Softmax in float32. The Triton path is flash-decoding: ``_partition_kernel`` runs one program per
(kv head, partition of ``partition_size`` tokens, row); the program serves every query head of its
GQA group, so each K/V tile is read once, and writes the group's partial output and log-sum-exp
to a preallocated workspace; programs past the row's end or before its window do nothing.
``_reduce_kernel`` combines a row's live partitions. The grid depends on shapes only and nothing
syncs with the host, so ``PagedAttention.forward`` can be captured in a CUDA graph.

``reference.paged_decode_attention`` is the torch twin (the engine's CPU path), and
``reference.write_kv`` writes new K/V into the cache by flat slot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hotmerge_kernels.ops import pdl
from hotmerge_kernels.ops.reference import check_decode_attention

LOG2E = 1.4426950408889634
# Launch shapes (first guesses for Hopper; benchmarks/paged_attention.py --tune sweeps them).
PARTITION_SIZE = 512  # tokens per partition: batch 32 x 8 kv heads x 2k tokens -> 1024 programs
TILE_SIZE = 64  # tokens per K/V tile inside a partition (halved for head_dim 256: shared memory)
NUM_WARPS = 4
NUM_STAGES = 3
REDUCE_CHUNK = 16  # partitions combined per step of the reduce


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # The CPU interpreter multiplies 16-bit floats wrongly (Triton 3.9): it gets float32 operands.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _partition_kernel(
    q_ptr, k_ptr, v_ptr, block_tables_ptr, seq_lens_ptr, part_out_ptr, part_lse_ptr,
    scale_log2, window,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_pb, stride_ph, stride_pp, stride_lb, stride_lh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, PARTITION: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl.enter(PDL)
    kv_head = tl.program_id(0)  # fastest: neighbouring programs read neighbouring head rows
    part = tl.program_id(1)
    row = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + row)
    first = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)  # first key in the window
    part_start = part * PARTITION
    lo = tl.maximum(part_start, first)
    hi = tl.minimum(part_start + PARTITION, seq_len)
    if lo < hi:
        g = tl.arange(0, GROUP_PAD)
        heads = kv_head * GROUP + g
        d = tl.arange(0, HEAD_DIM_PAD)
        d_ok = d < HEAD_DIM
        q = tl.load(
            q_ptr + row * stride_qb + heads[:, None] * stride_qh + d[None, :],
            mask=(g[:, None] < GROUP) & d_ok[None, :],
            other=0.0,
        ).to(k_ptr.dtype.element_ty)
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_PAD], tl.float32)  # noqa: E741
        acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
        table = block_tables_ptr + row * stride_bt
        # Tiles stay aligned to the partition; the first one holds ``lo``, so m is finite after it.
        tile_start = part_start + ((lo - part_start) // TILE) * TILE
        for t0 in range(tile_start, hi, TILE):
            tok = t0 + tl.arange(0, TILE)
            live = (tok >= lo) & (tok < hi)
            block = tl.load(table + tok // BLOCK_SIZE, mask=live, other=0).to(tl.int64)
            slot = tok % BLOCK_SIZE
            kv_mask = live[:, None] & d_ok[None, :]
            k_rows = k_ptr + block * stride_kb + slot * stride_kt + kv_head * stride_kh
            k = tl.load(k_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
            s = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale_log2
            s = tl.where(live[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)  # noqa: E741
            v_rows = v_ptr + block * stride_vb + slot * stride_vt + kv_head * stride_vh
            v = tl.load(v_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
            m = m_new
        out_rows = part_out_ptr + row * stride_pb + heads * stride_ph + part * stride_pp
        g_ok = g < GROUP
        tl.store(out_rows[:, None] + d[None, :], acc / l[:, None], mask=g_ok[:, None] & d_ok)
        lse = m + tl.log2(l)  # base 2, like the scores
        tl.store(part_lse_ptr + row * stride_lb + heads * stride_lh + part, lse, mask=g_ok)


@triton.jit
def _reduce_kernel(
    part_out_ptr, part_lse_ptr, seq_lens_ptr, out_ptr,
    window,
    stride_pb, stride_ph, stride_pp, stride_lb, stride_lh,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    PARTITION: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl.enter(PDL)
    head = tl.program_id(0)
    row = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + row)
    first = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)  # first key in the window
    p_lo = first // PARTITION
    p_hi = tl.cdiv(seq_len, PARTITION)  # live partitions: [p_lo, p_hi); none for a padding row
    base = row * stride_pb + head * stride_ph
    lse_ptr = part_lse_ptr + row * stride_lb + head * stride_lh
    d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = d < HEAD_DIM
    c = tl.arange(0, CHUNK)
    lse_max = tl.full([CHUNK], float("-inf"), tl.float32)
    for p0 in range(p_lo, p_hi, CHUNK):
        lse = tl.load(lse_ptr + p0 + c, mask=p0 + c < p_hi, other=float("-inf"))
        lse_max = tl.maximum(lse_max, lse)
    lse_max = tl.max(lse_max, 0)
    num = tl.zeros([HEAD_DIM_PAD], tl.float32)
    den = tl.zeros([CHUNK], tl.float32)
    for p0 in range(p_lo, p_hi, CHUNK):
        live = p0 + c < p_hi
        w = tl.exp2(tl.load(lse_ptr + p0 + c, mask=live, other=float("-inf")) - lse_max)
        o = tl.load(
            part_out_ptr + base + (p0 + c)[:, None] * stride_pp + d[None, :],
            mask=live[:, None] & d_ok[None, :],
            other=0.0,
        )
        num += tl.sum(w[:, None] * o, 0)
        den += w
    den_sum = tl.sum(den, 0)
    res = tl.where(den_sum > 0, num / tl.maximum(den_sum, 1e-30), 0.0)
    tl.store(
        out_ptr + row * stride_ob + head * stride_oh + d,
        res.to(out_ptr.dtype.element_ty),
        mask=d_ok,
    )


class PagedAttention:
    """Flash-decoding over a paged cache with its workspace preallocated for ``max_batch`` rows.

    Workspace: ``max_batch * num_heads * cdiv(max_blocks_per_seq * block_size, partition_size)
    * (head_dim + 1)`` float32 (7B, batch 64, 32k tokens, partition 512: 65 MiB).
    """

    def __init__(
        self,
        max_batch: int,
        num_heads: int,
        head_dim: int,
        max_blocks_per_seq: int,
        block_size: int,
        device: torch.device | str,
        *,
        partition_size: int = PARTITION_SIZE,
        tile_size: int | None = None,
        num_warps: int = NUM_WARPS,
        num_stages: int = NUM_STAGES,
    ) -> None:
        if tile_size is None:
            tile_size = min(TILE_SIZE, 8192 // triton.next_power_of_2(head_dim))
        if block_size & (block_size - 1) or tile_size & (tile_size - 1) or tile_size < 16:
            raise ValueError("block_size and tile_size must be powers of two, tile_size >= 16")
        if partition_size % tile_size:
            raise ValueError(f"partition_size {partition_size} not a multiple of {tile_size}")
        self.num_heads, self.head_dim, self.block_size = num_heads, head_dim, block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.partition_size, self.tile_size = partition_size, tile_size
        self.num_warps, self.num_stages = num_warps, num_stages
        max_parts = triton.cdiv(max_blocks_per_seq * block_size, partition_size)
        shape = (max_batch, num_heads, max_parts)
        self.part_out = torch.empty(*shape, head_dim, dtype=torch.float32, device=device)
        self.part_lse = torch.empty(shape, dtype=torch.float32, device=device)

    def forward(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        scale: float,
        sliding_window: int = 0,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, num_heads, head_dim = q.shape
        _, block_size, num_kv_heads, _ = k_cache.shape
        check_decode_attention(q, k_cache, v_cache, block_tables, seq_lens)
        if (num_heads, head_dim, block_size) != (self.num_heads, self.head_dim, self.block_size):
            raise ValueError(
                "q / cache shapes differ from the ones this PagedAttention was built for"
            )
        if batch > self.part_out.shape[0] or block_tables.shape[1] > self.max_blocks_per_seq:
            raise ValueError("batch or block table wider than this PagedAttention's workspace")
        if out is None:
            out = torch.empty_like(q)
        if batch == 0:
            return out
        group = num_heads // num_kv_heads
        parts = triton.cdiv(block_tables.shape[1] * block_size, self.partition_size)
        head_dim_pad = triton.next_power_of_2(head_dim)
        po, pl = self.part_out, self.part_lse
        precision = "ieee" if k_cache.dtype == torch.float32 else "tf32"  # tf32: unused for 16 bits
        _partition_kernel[(num_kv_heads, parts, batch)](
            q, k_cache, v_cache, block_tables, seq_lens, po, pl,
            scale * LOG2E, sliding_window,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            block_tables.stride(0),
            po.stride(0), po.stride(1), po.stride(2), pl.stride(0), pl.stride(1),
            GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=max(16, head_dim_pad),
            BLOCK_SIZE=block_size, TILE=self.tile_size, PARTITION=self.partition_size,
            PRECISION=precision, UPCAST=q.device.type != "cuda",
            num_warps=self.num_warps, num_stages=self.num_stages, **pdl.launch_options(q.device),
        )  # fmt: skip
        _reduce_kernel[(num_heads, batch)](
            po, pl, seq_lens, out,
            sliding_window,
            po.stride(0), po.stride(1), po.stride(2), pl.stride(0), pl.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
            PARTITION=self.partition_size, CHUNK=REDUCE_CHUNK,
            num_warps=1 if head_dim_pad <= 64 else 2, **pdl.launch_options(q.device),
        )  # fmt: skip
        return out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
    out: torch.Tensor | None = None,
    **launch,
) -> torch.Tensor:
    """The Triton path with a fresh workspace (tests, one-off calls); ``launch``: tile shapes."""
    attn = PagedAttention(
        q.shape[0], q.shape[1], q.shape[2], block_tables.shape[1], k_cache.shape[1], q.device,
        **launch,
    )  # fmt: skip
    return attn.forward(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, out)
