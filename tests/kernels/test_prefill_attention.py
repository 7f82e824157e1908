"""Paged prefill attention: the Triton kernel equals the torch twin, and the twin equals a plain
per-query softmax over contiguous K/V (CPU through the Triton interpreter; ``-m gpu`` at 7B
sizes)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hotmerge_kernels.ops import reference
from hotmerge_kernels.ops.prefill_attention import (
    BLOCK_M,
    paged_prefill_attention,
)

from tests.kernels.random_adapters import needs_triton


@dataclass
class Case:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    query_start: torch.Tensor
    query_lens: torch.Tensor
    query_pos: torch.Tensor
    scale: float
    window: int

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.query_start,
                self.query_lens, self.query_pos, self.scale, self.window)  # fmt: skip


def make_case(
    seqs: list[tuple[int, int]],
    *,
    block_size: int = 8,
    kv_heads: int = 2,
    group: int = 4,
    head_dim: int = 32,
    dtype: torch.dtype = torch.float32,
    window: int = 0,
    seed: int = 0,
    device: str = "cpu",
) -> Case:
    """``seqs``: (cached prefix, query tokens) per sequence; (0, 0) is an unused entry. The
    sequences' queries sit in the flat batch in reverse order with a spare token between them
    (a row no sequence owns). Blocks are scattered over a shuffled pool; table entries past a
    sequence's last token and blocks wholly before every query's window point at a block of
    NaN, so reading one fails the test."""
    gen = torch.Generator().manual_seed(seed)
    totals = [p + n for p, n in seqs]
    per_seq = [math.ceil(t / block_size) for t in totals]
    max_blocks = max(per_seq) + 2
    num_blocks = sum(per_seq) + 1
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    pool = torch.randperm(num_blocks, generator=gen)
    poison = int(pool[-1])
    k_cache[poison] = float("nan")
    v_cache[poison] = float("nan")
    tables = torch.full((len(seqs), max_blocks), poison, dtype=torch.int32)
    taken = 0
    for s, ((prefix, _), nb) in enumerate(zip(seqs, per_seq, strict=True)):
        tables[s, :nb] = pool[taken : taken + nb]
        taken += nb
        if window:
            dead = max(prefix - window + 1, 0) // block_size  # before the first query's window
            tables[s, :dead] = poison
    starts, first = [0] * len(seqs), 0
    for s in reversed(range(len(seqs))):
        starts[s] = first
        first += seqs[s][1] + 1
    q = torch.randn(first, kv_heads * group, head_dim, generator=gen).to(dtype)
    i32 = {"dtype": torch.int32, "device": device}
    return Case(
        q.to(device), k_cache.to(device), v_cache.to(device), tables.to(device),
        torch.tensor(starts, **i32), torch.tensor([n for _, n in seqs], **i32),
        torch.tensor([p for p, _ in seqs], **i32), scale=head_dim**-0.5, window=window,
    )  # fmt: skip


def per_query_oracle(case: Case) -> torch.Tensor:
    """Query by query: contiguous keys from the block table, float64 softmax over the window;
    rows of no sequence stay NaN."""
    q, kc, vc = case.q.double(), case.k_cache.double(), case.v_cache.double()
    block_size, kv_heads = kc.shape[1], kc.shape[2]
    out = torch.full_like(q, float("nan"))
    per_seq = zip(
        case.query_start.tolist(), case.query_lens.tolist(), case.query_pos.tolist(), strict=True
    )
    for s, (first, length, start) in enumerate(per_seq):
        for i in range(length):
            p = start + i
            pos = torch.arange(p + 1)
            if case.window:
                pos = pos[pos > p - case.window]
            blocks = case.block_tables[s].long()[pos // block_size]
            k = kc[blocks, pos % block_size].repeat_interleave(q.shape[1] // kv_heads, dim=1)
            v = vc[blocks, pos % block_size].repeat_interleave(q.shape[1] // kv_heads, dim=1)
            scores = torch.einsum("hd,thd->ht", q[first + i], k) * case.scale
            out[first + i] = torch.einsum("ht,thd->hd", scores.softmax(-1), v)
    return out


def poisoned_like(q: torch.Tensor) -> torch.Tensor:
    return torch.full_like(q, float("nan"))


def owned(case: Case) -> torch.Tensor:
    """Which rows of q belong to a sequence."""
    rows = torch.zeros(case.q.shape[0], dtype=torch.bool)
    for first, n in zip(case.query_start.tolist(), case.query_lens.tolist(), strict=True):
        rows[first : first + n] = True
    return rows


TOL = {  # kernel vs twin: the kernel rounds softmax weights to the cache dtype for the MMA
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 3e-2, "rtol": 2e-2},
    torch.float16: {"atol": 4e-3, "rtol": 4e-3},
}

# (prefix, queries): whole prompts of 1, block size +- 1, a query tile +- 1; chunks after a
# prefix (one crossing a block edge); an unused entry.
EDGE_SEQS = [(0, 1), (0, 7), (0, 9), (0, BLOCK_M - 1), (0, BLOCK_M + 1), (5, 4), (16, 20), (0, 0)]


@pytest.mark.parametrize("window", [0, 6, 50])
@pytest.mark.parametrize("group", [1, 4])
def test_twin_matches_reference(group, window):
    case = make_case(EDGE_SEQS, group=group, window=window, seed=group * 3 + window)
    got = reference.paged_prefill_attention(*case.args(), out=poisoned_like(case.q))
    rows = owned(case)
    torch.testing.assert_close(
        got[rows].double(), per_query_oracle(case)[rows], atol=1e-5, rtol=1e-5
    )
    assert got[~rows].isnan().all(), "rows of no sequence were written"


@needs_triton
@pytest.mark.parametrize(
    "group,window,block_size",
    [(1, 0, 8), (4, 0, 8), (8, 0, 16), (4, 6, 8), (1, 50, 4), (8, 17, 16)],
)
def test_kernel_matches_twin(group, window, block_size):
    case = make_case(
        EDGE_SEQS, group=group, window=window, block_size=block_size, seed=group + window,
        kv_heads=2 if group < 8 else 1,
    )  # fmt: skip
    want = reference.paged_prefill_attention(*case.args())
    got = paged_prefill_attention(*case.args(), out=poisoned_like(case.q), block_n=16)
    rows = owned(case)
    assert not got[rows].isnan().any(), "unwritten or poisoned output"
    torch.testing.assert_close(got[rows], want[rows], **TOL[case.q.dtype])
    assert got[~rows].isnan().all(), "rows of no sequence were written"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_half_precision(dtype):
    case = make_case([(3, 30), (0, 12)], dtype=dtype, block_size=16, window=11, seed=5)
    want = reference.paged_prefill_attention(*case.args())
    got = paged_prefill_attention(*case.args(), out=poisoned_like(case.q))
    rows = owned(case)
    torch.testing.assert_close(got[rows].float(), want[rows].float(), **TOL[dtype])


def test_rejects_contract_violations():
    case = make_case([(0, 3)])
    with pytest.raises(ValueError, match="int32"):
        reference.paged_prefill_attention(case.q, case.k_cache, case.v_cache,
                                      case.block_tables.long(), case.query_start,
                                      case.query_lens, case.query_pos, 1.0)  # fmt: skip
    with pytest.raises(ValueError, match="does not fit"):
        reference.paged_prefill_attention(case.q[:, :3], case.k_cache, case.v_cache,
                                      case.block_tables, case.query_start, case.query_lens,
                                      case.query_pos, 1.0)  # fmt: skip
    with pytest.raises(ValueError, match=r"\(S,\)"):
        reference.paged_prefill_attention(case.q, case.k_cache, case.v_cache, case.block_tables,
                                      case.query_start[:0], case.query_lens, case.query_pos,
                                      1.0)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("window", [0, 4096])
def test_gpu_7b_shapes(window):
    """Mistral-7B heads (32 query, 8 kv, dim 128), bf16: prompts of 128 and 700 tokens, a 300-token
    chunk after a 1000-token prefix."""
    seqs = [(0, 128), (0, 700), (1000, 300), (0, 0)]
    case = make_case(seqs, kv_heads=8, group=4, head_dim=128, dtype=torch.bfloat16,
                     block_size=16, window=window, device="cuda")  # fmt: skip
    want = reference.paged_prefill_attention(*case.args())
    got = paged_prefill_attention(*case.args(), out=poisoned_like(case.q))
    rows = owned(case).cuda()
    torch.testing.assert_close(got[rows].float(), want[rows].float(), **TOL[torch.bfloat16])


@needs_triton
@pytest.mark.parametrize("window", [0, 6])
def test_rows_in_the_decode_kernel_then_the_rest_in_the_prefill_kernel(window):
    """A mixed step's layout as the engine runs it: three one-token rows in front (tokens and
    sequences 0-2), a 7-token prompt chunk, an unused entry, padding tokens. q is a strided
    view (of the fused qkv output); the decode kernel writes ``out``'s first rows (one per
    sequence entry, row lengths 0 past the rows) through a view, then the prefill kernel (the
    rows' query lengths 0) the prompt's rows: together they equal the prefill twin over every
    chunk."""
    from hotmerge_kernels.ops.paged_attention import PagedAttention

    seqs = [(9, 1), (17, 1), (4, 1), (5, 7), (0, 0)]  # (cached prefix, queries)
    case = make_case(seqs, window=window, seed=31)
    # The engine's flat layout: rows first, one token each at their sequence's index.
    firsts = [0, 1, 2, 3, 0]
    tokens = 3 + 7 + 2  # padding tokens after the prompt
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(tokens, case.q.shape[1] * 2, case.q.shape[2], generator=gen)
    q = wide[:, : case.q.shape[1]]  # strided: every token's row is twice as wide
    i32 = {"dtype": torch.int32}
    starts = torch.tensor(firsts, **i32)
    lens = case.query_lens
    want = torch.full_like(q, float("nan"))
    reference.paged_prefill_attention(
        q, case.k_cache, case.v_cache, case.block_tables, starts, lens, case.query_pos,
        case.scale, window, out=want,
    )  # fmt: skip
    rows = len(seqs)  # the engine's entries: every sequence entry (0: not a row)
    row_lens = torch.tensor([p + 1 for p, _ in seqs[:3]] + [0, 0], **i32)
    prefill_lens = torch.tensor([0, 0, 0, 7, 0], **i32)
    attn = PagedAttention(rows, q.shape[1], q.shape[2], case.block_tables.shape[1],
                          case.k_cache.shape[1], "cpu")  # fmt: skip
    got = torch.full_like(q, float("nan"))
    attn.forward(q[:rows], case.k_cache, case.v_cache, case.block_tables[:rows], row_lens,
                 case.scale, window, out=got[:rows])  # fmt: skip
    paged_prefill_attention(
        q, case.k_cache, case.v_cache, case.block_tables, starts, prefill_lens, case.query_pos,
        case.scale, window, out=got,
    )  # fmt: skip
    owned_rows = slice(0, 3 + 7)  # the padding tokens after them: written by neither
    torch.testing.assert_close(got[owned_rows], want[owned_rows], **TOL[torch.float32])
