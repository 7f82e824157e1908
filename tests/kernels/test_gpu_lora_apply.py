"""Multi-LoRA shrink/expand kernels on the device at Mistral-7B sizes (``pytest -m gpu``) with the
engine's split counts, and inside a captured CUDA graph replayed with new slots (bit-identical to
the same calls run eagerly: no atomics, fixed sums)."""

from __future__ import annotations

import pytest
import torch
from hotmerge_kernels.ops import reference
from hotmerge_kernels.ops.lora import (
    LoraKernelMeta,
    lora_expand,
    lora_shrink,
    lora_splits,
    lora_workspace,
)
from hotmerge_kernels.ops.pdl import launch_options

from tests.kernels.test_lora_apply import assert_close, defined

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

HIDDEN, INTERMEDIATE, KV = 4096, 14336, 1024
GROUPS = {  # projection group: (in_features, slice widths)
    "qkv": (HIDDEN, (HIDDEN, KV, KV)),
    "o": (HIDDEN, (HIDDEN,)),
    "gate_up": (HIDDEN, (INTERMEDIATE, INTERMEDIATE)),
    "down": (INTERMEDIATE, (HIDDEN,)),
}
# 34 slots, so 32 rows can all differ: cat-merged rank 128, an odd rank, empty slots.
RANKS = (16, 16, 64, 128, 8, 37, 16, 0) * 4 + (16, 16)
MAX_RANK = 128
Y_TOL = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 1e-5}


def device_pool(widths, n_in, dtype, seed):
    """(lora_a, lora_b, slot_ranks, slice_offsets) on the device; entries past a rank are NaN."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    n, out_total = len(RANKS), sum(widths)
    lora_a = torch.randn(n, len(widths), MAX_RANK, n_in, generator=gen, device="cuda") * 0.03
    lora_b = torch.randn(n, MAX_RANK, out_total, generator=gen, device="cuda") * 0.03
    for i, r in enumerate(RANKS):
        lora_a[i, :, r:] = float("nan")
        lora_b[i, r:] = float("nan")
    offsets = tuple(sum(widths[:i]) for i in range(len(widths) + 1))
    slot_ranks = torch.tensor(RANKS, dtype=torch.int32, device="cuda")
    return lora_a.to(dtype), lora_b.to(dtype), slot_ranks, offsets


def slots_for(case: str, t: int, gen: torch.Generator) -> torch.Tensor:
    n = len(RANKS)
    if case == "distinct":
        slots = torch.arange(t) % (n + 1) - 1  # -1 then distinct slots (t <= n + 1)
    elif case == "shared":
        slots = torch.full((t,), 2)
    elif case == "prompts":  # 128-token prompts over 8 slots of several ranks, one base prompt
        slots = (torch.arange(t) // 128) % 9 - 1
    elif case == "mixed":  # decode rows over 8 slots, then one prompt (a mixed step)
        slots = torch.cat([torch.arange(32) % 8, torch.full((t - 32,), 5)])
    else:  # prefill: two adapters, a few base-model tokens
        slots = torch.where(torch.rand(t, generator=gen) < 0.5, 3, 5)
        slots[torch.rand(t, generator=gen) < 0.05] = -1
    return slots.to(torch.int32).cuda()


def check(group: str, t: int, case: str, dtype: torch.dtype) -> None:
    n_in, widths = GROUPS[group]
    lora_a, lora_b, slot_ranks, offsets = device_pool(widths, n_in, dtype, seed=t)
    gen = torch.Generator().manual_seed(t)
    token_slots = slots_for(case, t, gen)
    x = torch.randn(t, n_in, generator=gen).to("cuda", dtype)
    y0 = torch.randn(t, offsets[-1], generator=gen).to("cuda", dtype)
    shape = (lora_splits(n_in, t), len(widths), t, MAX_RANK)
    bufs = [torch.full(shape, float("nan"), device="cuda") for _ in range(2)]
    ys = [y0.clone(), y0.clone()]
    lora_shrink(x, lora_a, slot_ranks, token_slots, bufs[0])
    lora_expand(bufs[0], lora_b, slot_ranks, token_slots, ys[0], offsets)
    reference.lora_shrink(x, lora_a, slot_ranks, token_slots, bufs[1])
    reference.lora_expand(bufs[1], lora_b, slot_ranks, token_slots, ys[1], offsets)
    got_buf, want_buf = (defined(b, slot_ranks, token_slots) for b in bufs)
    assert_close(got_buf, want_buf, 1e-4)
    assert_close(ys[0], ys[1], Y_TOL[dtype])
    skip = [i for i, s in enumerate(token_slots.tolist()) if s < 0 or RANKS[s] == 0]
    assert torch.equal(ys[0][skip], y0[skip])


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("t,case", [(1, "shared"), (32, "distinct"), (64, "shared")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_at_7b_sizes(group, t, case, dtype):
    check(group, t, case, dtype)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("t,case", [(512, "prefill"), (2048, "prompts"), (160, "mixed")])
def test_prefill_at_7b_sizes(group, t, case):
    check(group, t, case, torch.bfloat16)


def test_float32_at_7b_sizes():
    check("qkv", 17, "distinct", torch.float32)


@pytest.mark.parametrize("t", [32, 300])
def test_graph_replay_with_new_slots(t):
    """Meta update, shrink and expand captured once; each replay reads the slots then in place
    (at 300 tokens the prefill kernels walk the tile list the captured update rebuilds). On
    Hopper the decode kernels are programmatic dependents: shrink right after the copy that
    writes its x, expand after shrink, both reading y after that copy."""
    dtype = torch.bfloat16
    pdl = launch_options(torch.device("cuda"))["PDL"]
    assert pdl == (torch.cuda.get_device_capability()[0] >= 9)
    n_in, widths = GROUPS["qkv"]
    lora_a, lora_b, slot_ranks, offsets = device_pool(widths, n_in, dtype, seed=1)
    gen = torch.Generator().manual_seed(2)
    token_slots = slots_for("distinct", t, gen)
    x_in = torch.randn(t, n_in, generator=gen).to("cuda", dtype)
    x = torch.empty_like(x_in)
    y_in = torch.randn(t, offsets[-1], generator=gen).to("cuda", dtype)
    y = y_in.clone()
    buf = lora_workspace([n_in], len(widths), t, MAX_RANK, "cuda").fill_(float("nan"))
    assert buf.shape[0] > 1  # both paths split in_features
    meta = LoraKernelMeta(t, len(RANKS), "cuda")

    def step():
        meta.update(token_slots)
        y.copy_(y_in)
        x.copy_(x_in)
        lora_shrink(x, lora_a, slot_ranks, token_slots, buf, meta)
        lora_expand(buf, lora_b, slot_ranks, token_slots, y, offsets, meta)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        new = torch.randint(-1, len(RANKS), (t,), generator=gen, dtype=torch.int32)
        token_slots.copy_(new.cuda())
        x_in.copy_(torch.randn(t, n_in, generator=gen).to("cuda", dtype))
        graph.replay()
        torch.cuda.synchronize()
        replayed = y.clone()
        step()  # the same launches, eagerly
        assert torch.equal(y, replayed)
        want_buf = torch.full_like(buf, float("nan"))
        want = y_in.clone()
        reference.lora_shrink(x, lora_a, slot_ranks, token_slots, want_buf)
        reference.lora_expand(want_buf, lora_b, slot_ranks, token_slots, want, offsets)
        assert_close(y, want, Y_TOL[dtype])
