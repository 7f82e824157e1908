"""Paged prefill attention: each sequence's chunk of query tokens against its cached prefix and
the chunk itself, causal, windowed where the layer is, in one launch for the whole batch.

Contract (the engine owns the tensors):

- ``q``, ``out``: ``(T, num_heads, head_dim)``, the query tokens of every sequence, flat.
- ``k_cache``, ``v_cache``: ``(num_blocks, block_size, num_kv_heads, head_dim)``; every key a
  query attends is in the cache already (the chunk's own keys are written before the call).
- per sequence ``s`` (int32, ``(S,)``): ``query_start[s]``, the flat index of its first query
  token; ``query_lens[s]``, its query tokens (0: an unused entry); ``query_pos[s]``, the position
  of its first query token (the cached prefix is positions ``0 .. query_pos[s] - 1``);
  ``block_tables (S, max_blocks)`` int32 maps its positions to cache blocks.
- The query at position p attends keys j <= p, and j > p - window when ``window`` > 0
  (transformers' sliding window). Softmax in float32. Rows of ``out`` that belong to no
  sequence are not written.

The Triton kernel is a flash-attention forward over the paged cache: one program per (query
head, tile of ``BLOCK_M`` queries, sequence); it walks key tiles of ``BLOCK_N`` positions from
the window's start to its last query through the block table, with an online softmax. The grid
depends on shapes only (tiles past a sequence's length exit at once) and nothing syncs with the
host, so a prefill forward can be captured in a CUDA graph. Query heads of one GQA group are
neighbouring programs: their shared K/V tiles come from L2 after the first read.

``reference.paged_prefill_attention`` is the torch twin (the engine's CPU path): one SDPA per
sequence over its gathered prefix.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hotmerge_kernels.ops.paged_attention import LOG2E, _dot
from hotmerge_kernels.ops.reference import check_prefill_attention

BLOCK_M = 64  # queries per program
NUM_WARPS = 4
NUM_STAGES = 2


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, block_tables_ptr,
    query_start_ptr, query_lens_ptr, query_pos_ptr,
    scale_log2, window,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    head = tl.program_id(0)
    tile = tl.program_id(1)
    seq = tl.program_id(2)
    count = tl.load(query_lens_ptr + seq) - tile * BLOCK_M  # this tile's queries (if > 0)
    if count > 0:
        m = tl.arange(0, BLOCK_M)
        q_ok = m < count
        d = tl.arange(0, HEAD_DIM_PAD)
        d_ok = d < HEAD_DIM
        first_pos = tl.load(query_pos_ptr + seq) + tile * BLOCK_M
        q_pos = first_pos + m
        tokens = (tl.load(query_start_ptr + seq) + tile * BLOCK_M + m).to(tl.int64)
        q = tl.load(
            q_ptr + tokens[:, None] * stride_qt + head * stride_qh + d[None, :],
            mask=q_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        kv_head = head // GROUP
        table = block_tables_ptr + seq * stride_bt
        hi = first_pos + tl.minimum(count, BLOCK_M)  # past the tile's last query
        lo = tl.where(window > 0, tl.maximum(first_pos - window + 1, 0), 0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
        for k0 in range(lo, hi, BLOCK_N):
            j = k0 + tl.arange(0, BLOCK_N)
            live = j < hi
            block = tl.load(table + j // BLOCK_SIZE, mask=live, other=0).to(tl.int64)
            slot = j % BLOCK_SIZE
            kv_mask = live[:, None] & d_ok[None, :]
            k_rows = k_ptr + block * stride_kb + slot * stride_kt + kv_head * stride_kh
            k = tl.load(k_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
            s = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale_log2
            seen = live[None, :] & (j[None, :] <= q_pos[:, None])
            seen = seen & ((window == 0) | (j[None, :] > q_pos[:, None] - window))
            s = tl.where(seen, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no key yet keeps m = -inf: shift by 0 instead (no NaN).
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - shift)
            p = tl.exp2(s - shift[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v_rows = v_ptr + block * stride_vb + slot * stride_vt + kv_head * stride_vh
            v = tl.load(v_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
            m_i = m_new
        out = acc / tl.maximum(l_i, 1e-30)[:, None]
        tl.store(
            out_ptr + tokens[:, None] * stride_ot + head * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=q_ok[:, None] & d_ok[None, :],
        )


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    query_lens: torch.Tensor,
    query_pos: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
    out: torch.Tensor | None = None,
    *,
    block_n: int | None = None,
) -> torch.Tensor:
    """The Triton path (see the module docstring); ``out`` defaults to a new tensor."""
    check_prefill_attention(q, k_cache, v_cache, block_tables, query_start, query_lens, query_pos)
    tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if out is None:
        out = torch.empty_like(q)
    seqs = block_tables.shape[0]
    if tokens == 0 or seqs == 0:
        return out
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    if block_n is None:
        block_n = 64 if head_dim_pad <= 128 else 32  # shared memory for q, k and v tiles
    precision = "ieee" if k_cache.dtype == torch.float32 else "tf32"  # tf32: unused for 16 bits
    grid = (num_heads, triton.cdiv(tokens, BLOCK_M), seqs)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables,
        query_start, query_lens, query_pos,
        scale * LOG2E, sliding_window,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size, BLOCK_M=BLOCK_M, BLOCK_N=block_n,
        PRECISION=precision, UPCAST=q.device.type != "cuda",
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    return out
