"""The start-up merges that compile the merge kernels: every strategy and sign method, each a
valid merge (run here through the torch twins on a tiny model's shapes); nothing runs off CUDA."""

from __future__ import annotations

import pytest
import torch
from hotmerge.merging.warm_up import warm_merge_kernels, warm_up_merges
from hotmerge_kernels.merge import merge_adapters
from hotmerge_kernels.merge.params import MergeParams, SignMethod, Strategy

from tests.kernels.random_adapters import make_adapter

SHAPES = {f"model.layers.0.self_attn.{n}": (64, 64) for n in ("q_proj", "v_proj")}


def test_the_warm_up_covers_every_strategy_and_sign_method_and_each_merge_runs():
    merges = warm_up_merges()
    assert {p.strategy for _, p in merges} == set(Strategy)
    for strategy in (Strategy.TIES, Strategy.DARE_TIES, Strategy.TIES_SVD):
        assert {p.sign_method for _, p in merges if p.strategy is strategy} == set(SignMethod)
    assert {n for n, p in merges if p.strategy is Strategy.TIES} == {2, 3}
    adapters = [make_adapter(SHAPES, 4, seed=s) for s in range(3)]
    for inputs, params in merges:
        merged = merge_adapters(adapters[:inputs], params).adapter
        assert torch.isfinite(merged.buffer).all() and merged.buffer.abs().max() > 0


def test_nothing_is_warmed_off_cuda():
    assert warm_merge_kernels(SHAPES, torch.device("cpu"), torch.float32) == 0


@pytest.mark.gpu
def test_after_the_warm_up_fresh_merges_compile_nothing():
    """After the warm-up, merges with other weights, densities and seeds (1 and 2**40 + 16
    among them, values Triton would specialize on) launch compiled kernels only."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from triton import knobs

    device = torch.device("cuda")
    shapes = {f"model.layers.{i}.mlp.{n}": (256, 512) for i in range(2) for n in ("up_proj",)}
    warm_merge_kernels(shapes, device, torch.bfloat16)
    adapters = [
        make_adapter(shapes, 16, seed=s, dtype=torch.bfloat16, device="cuda") for s in range(3)
    ]
    compiled = []
    before = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = lambda *, fn, **_: compiled.append(fn.name)
    try:
        for seed in (1, 2**40 + 16, 7):
            for strategy in (Strategy.DARE_TIES, Strategy.DARE_LINEAR, Strategy.TIES):
                params = MergeParams(strategy, (0.9, 0.3, 0.2), density=0.3, seed=seed)
                merge_adapters(adapters, params)
        torch.cuda.synchronize()
    finally:
        knobs.runtime.jit_cache_hook = before
    assert compiled == []
