"""Paged decode attention: the Triton kernels equal the torch twin, and the twin equals a plain
per-row softmax over contiguous K/V (CPU through the Triton interpreter; ``-m gpu`` at 7B sizes)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hotmerge_kernels.ops import reference
from hotmerge_kernels.ops.paged_attention import (
    PagedAttention,
    paged_decode_attention,
)

from tests.kernels.random_adapters import needs_triton

# Small launch shapes so that short rows still cross tiles and partitions.
SMALL_LAUNCH = {"partition_size": 32, "tile_size": 16}
EDGE_LENS = [1, 7, 8, 9, 33, 64, 65, 100]  # block size 8: 1, bs - 1, bs, bs + 1, partitions 32


@dataclass
class Case:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    scale: float
    window: int

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens, self.scale)


def make_case(
    lens: list[int],
    *,
    block_size: int = 8,
    kv_heads: int = 2,
    group: int = 4,
    head_dim: int = 32,
    dtype: torch.dtype = torch.float32,
    window: int = 0,
    spare_blocks: int = 3,
    seed: int = 0,
    device: str = "cpu",
) -> Case:
    """Random caches; rows' blocks scattered over a shuffled pool. Every table entry the kernel
    must not read (past a row's length, wholly before its window, padding rows) points at a
    block full of NaN, so reading one fails the test."""
    gen = torch.Generator().manual_seed(seed)
    per_row = [math.ceil(n / block_size) for n in lens]
    max_blocks = max(per_row) + spare_blocks
    num_blocks = sum(per_row) + 1
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    pool = torch.randperm(num_blocks, generator=gen)
    poison = int(pool[-1])
    k_cache[poison] = float("nan")
    v_cache[poison] = float("nan")
    tables = torch.full((len(lens), max_blocks), poison, dtype=torch.int32)
    taken = 0
    for row, (n, nb) in enumerate(zip(lens, per_row, strict=True)):
        tables[row, :nb] = pool[taken : taken + nb]
        taken += nb
        if window:
            dead = max(n - window, 0) // block_size  # blocks wholly before the window
            tables[row, :dead] = poison
    q = torch.randn(len(lens), kv_heads * group, head_dim, generator=gen).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    to = {"device": device}
    return Case(
        q.to(**to), k_cache.to(**to), v_cache.to(**to), tables.to(**to), seq_lens.to(**to),
        scale=head_dim**-0.5, window=window,
    )  # fmt: skip


def per_row_oracle(case: Case) -> torch.Tensor:
    """Row by row: contiguous K/V from the block table, float64 softmax over the window."""
    q, kc, vc = case.q.double(), case.k_cache.double(), case.v_cache.double()
    block_size, kv_heads = kc.shape[1], kc.shape[2]
    out = torch.zeros_like(q)
    for row, n in enumerate(case.seq_lens.tolist()):
        if n == 0:
            continue
        pos = torch.arange(n)
        if case.window:
            pos = pos[pos > n - 1 - case.window]
        blocks = case.block_tables[row].long()[pos // block_size]
        k = kc[blocks, pos % block_size].repeat_interleave(q.shape[1] // kv_heads, dim=1)
        v = vc[blocks, pos % block_size].repeat_interleave(q.shape[1] // kv_heads, dim=1)
        scores = torch.einsum("hd,thd->ht", q[row], k) * case.scale
        out[row] = torch.einsum("ht,thd->hd", scores.softmax(-1), v)
    return out


def poisoned_like(q: torch.Tensor) -> torch.Tensor:
    return torch.full_like(q, float("nan"))


TOL = {  # kernel vs twin: the kernel rounds softmax weights to the cache dtype for the MMA
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 3e-2, "rtol": 2e-2},
    torch.float16: {"atol": 4e-3, "rtol": 4e-3},
}


def poisoned_attention(case: Case, **launch) -> PagedAttention:
    """A PagedAttention sized for the case whose workspace starts as NaN, so a partition the
    reduce reads but no program wrote fails the test."""
    q, tables = case.q, case.block_tables
    attn = PagedAttention(*q.shape, tables.shape[1], case.k_cache.shape[1], q.device, **launch)
    attn.part_out.fill_(float("nan"))
    attn.part_lse.fill_(float("nan"))
    return attn


def assert_kernel_matches(case: Case, **launch) -> torch.Tensor:
    want = reference.paged_decode_attention(*case.args(), case.window)
    attn = poisoned_attention(case, **launch)
    got = attn.forward(*case.args(), case.window, out=poisoned_like(case.q))
    assert not got.isnan().any(), "unwritten or poisoned output"
    torch.testing.assert_close(got.float(), want.float(), **TOL[case.q.dtype])
    padding = case.seq_lens == 0
    assert torch.equal(got[padding], torch.zeros_like(got[padding]))
    return got


# ---- the twin against the per-row reference ---------------------------------------------------


@pytest.mark.parametrize("window", [0, 5, 200])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_twin_matches_reference(group, window):
    case = make_case([*EDGE_LENS, 0], group=group, window=window, seed=group * 7 + window)
    got = reference.paged_decode_attention(*case.args(), case.window, out=poisoned_like(case.q))
    torch.testing.assert_close(got.double(), per_row_oracle(case), atol=1e-5, rtol=1e-5)
    assert torch.equal(got[-1], torch.zeros_like(got[-1]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_twin_half_precision_matches_reference(dtype):
    case = make_case([3, 17, 40], dtype=dtype, block_size=16, window=11, seed=3)
    got = reference.paged_decode_attention(*case.args(), case.window)
    want = per_row_oracle(case).to(
        dtype
    )  # softmax in float32 on the same inputs: one rounding apart
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


def test_twin_all_padding_rows_give_zeros():
    case = make_case([0, 0])
    got = reference.paged_decode_attention(*case.args(), out=poisoned_like(case.q))
    assert torch.equal(got, torch.zeros_like(got))


def test_write_kv_then_attend_equals_sdpa():
    """New tokens written by slot (some skipped) then attended: the last token's causal SDPA."""
    gen = torch.Generator().manual_seed(11)
    block_size, kv_heads, head_dim, n = 4, 2, 16, 10
    k_cache = torch.randn(8, block_size, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn_like(k_cache)
    before = (k_cache.clone(), v_cache.clone())
    blocks = torch.tensor([5, 2, 7], dtype=torch.int32)
    slots = blocks.long()[torch.arange(n) // block_size] * block_size + torch.arange(n) % 4
    k = torch.randn(n + 2, kv_heads, head_dim, generator=gen)
    v = torch.randn(n + 2, kv_heads, head_dim, generator=gen)
    slot_mapping = torch.cat([slots[:4], torch.tensor([-1]), slots[4:], torch.tensor([-1])])
    k_in = torch.cat([k[:4], k[n : n + 1], k[4:n], k[n + 1 :]])
    v_in = torch.cat([v[:4], v[n : n + 1], v[4:n], v[n + 1 :]])
    reference.write_kv(k_in, v_in, k_cache, v_cache, slot_mapping)

    written = torch.zeros(8, block_size, dtype=torch.bool)
    written[slots // block_size, slots % block_size] = True
    assert torch.equal(k_cache[~written], before[0][~written])
    assert torch.equal(v_cache[~written], before[1][~written])
    assert torch.equal(k_cache[slots // block_size, slots % block_size], k[:n])

    q = torch.randn(1, kv_heads * 3, head_dim, generator=gen)
    got = reference.paged_decode_attention(
        q, k_cache, v_cache, blocks[None], torch.tensor([n], dtype=torch.int32), 0.3
    )
    want = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k[:n].transpose(0, 1)[None], v[:n].transpose(0, 1)[None],
        scale=0.3, enable_gqa=True,
    )  # fmt: skip
    torch.testing.assert_close(got, want[:, :, 0], atol=1e-5, rtol=1e-5)


def test_rejects_contract_violations():
    case = make_case([3])
    with pytest.raises(ValueError, match="int32"):
        reference.paged_decode_attention(case.q, case.k_cache, case.v_cache,
                                     case.block_tables.long(), case.seq_lens, 1.0)  # fmt: skip
    with pytest.raises(ValueError, match="does not fit"):
        reference.paged_decode_attention(case.q[:, :3], case.k_cache, case.v_cache,
                                     case.block_tables, case.seq_lens, 1.0)  # fmt: skip


# ---- the Triton kernels against the twin (CPU interpreter) ------------------------------------


@needs_triton
@pytest.mark.parametrize(
    ("group", "window"), [(1, 0), (1, 40), (4, 0), (4, 5), (4, 40), (4, 200), (8, 0), (8, 5)]
)
def test_kernel_matches_twin(group, window):
    case = make_case([0, *EDGE_LENS, 0], group=group, window=window, seed=100 + group + window)
    assert_kernel_matches(case, **SMALL_LAUNCH)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [0, 20])
def test_kernel_half_precision(dtype, window):
    case = make_case([1, 16, 17, 70, 0], dtype=dtype, block_size=16, window=window, seed=5)
    got = assert_kernel_matches(case, **SMALL_LAUNCH)
    assert got.dtype == dtype


@needs_triton
@pytest.mark.parametrize(
    ("block_size", "head_dim", "launch"),
    [
        (32, 64, {"partition_size": 64, "tile_size": 32}),  # tile inside one block
        (8, 48, SMALL_LAUNCH),  # head_dim not a power of two: masked to 64
        (16, 32, {}),  # the GPU defaults: one partition, one tile
    ],
)
def test_kernel_shapes(block_size, head_dim, launch):
    case = make_case([1, 31, 95, 0], block_size=block_size, head_dim=head_dim, seed=9)
    assert_kernel_matches(case, **launch)


@needs_triton
def test_workspace_reused_across_batches_and_table_widths():
    """One PagedAttention (as a captured graph holds it), poisoned workspace, smaller batches and
    narrower block tables than it was built for."""
    attn = PagedAttention(6, 8, 32, 16, 8, "cpu", **SMALL_LAUNCH)
    attn.part_out.fill_(float("nan"))
    attn.part_lse.fill_(float("nan"))
    for seed, lens in enumerate([[5, 90, 0, 41, 64, 1], [33, 2], [120]]):
        case = make_case(lens, spare_blocks=0, seed=50 + seed)
        got = attn.forward(*case.args(), out=poisoned_like(case.q))
        want = reference.paged_decode_attention(*case.args())
        torch.testing.assert_close(got, want, **TOL[torch.float32])


@needs_triton
def test_functional_form_allocates_its_output():
    case = make_case([12, 0, 40], window=20, seed=21)
    got = paged_decode_attention(*case.args(), case.window, **SMALL_LAUNCH)
    want = reference.paged_decode_attention(*case.args(), case.window)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@needs_triton
def test_kernel_rejects_oversized_batch():
    attn = PagedAttention(1, 8, 32, 4, 8, "cpu")
    case = make_case([3, 4])
    with pytest.raises(ValueError, match="workspace"):
        attn.forward(*case.args())


# ---- GPU: 7B shapes ---------------------------------------------------------------------------

SEVEN_B = {"kv_heads": 8, "group": 4, "head_dim": 128, "block_size": 16, "dtype": torch.bfloat16}


def mixed_lens(batch: int, context: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, context + 1, (batch,), generator=gen)
    lens[0], lens[-1] = context, 0  # the longest row and a padding row
    return lens.tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("window", [0, 1024])
@pytest.mark.parametrize("context", [2048, 8192])
def test_gpu_7b_matches_twin(context, window):
    case = make_case(mixed_lens(32, context, context), window=window, device="cuda", **SEVEN_B)
    assert_kernel_matches(case)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay():
    """Captured once; replayed after new lengths and block tables are copied into its inputs."""
    batch, context = 32, 2048
    case = make_case(mixed_lens(batch, context, 1), device="cuda", spare_blocks=0, **SEVEN_B)
    case.k_cache.nan_to_num_(0.0)  # the tables below point anywhere in the pool
    case.v_cache.nan_to_num_(0.0)
    max_blocks = case.block_tables.shape[1]
    attn = PagedAttention(batch, 32, 128, max_blocks, 16, "cuda")
    q, tables, lens = case.q.clone(), case.block_tables.clone(), case.seq_lens.clone()
    out = torch.empty_like(q)
    args = (q, case.k_cache, case.v_cache, tables, lens, case.scale)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        attn.forward(*args, out=out)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attn.forward(*args, out=out)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        new_lens = torch.tensor(mixed_lens(batch, context, 10 + seed), dtype=torch.int32)
        new_tables = torch.randint(0, case.k_cache.shape[0], (batch, max_blocks), generator=gen)
        lens.copy_(new_lens)
        tables.copy_(new_tables.int())
        q.normal_()
        out.fill_(float("nan"))
        graph.replay()
        want = reference.paged_decode_attention(*args)
        torch.testing.assert_close(out.float(), want.float(), **TOL[torch.bfloat16])
