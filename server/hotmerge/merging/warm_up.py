"""The merge kernels compiled at start-up, so that no request meets a JIT compile.

Triton compiles a kernel variant the first time a process launches it: per strategy, sign
method and number of inputs, about half a second each on an H100, on the request's thread, while
the engine thread waits for the GIL. On the H100 two such compiles in the first second of a
load took the first tokens of everything in flight to 1.1 s
(``benchmarks/results/gpu-checks-H100-2026-12-07-c``). So before serving, on CUDA, every
element-wise strategy (each sign method, DARE with a seed) merges two and three random adapters
of the served model's shapes once, and every ΔW-space strategy two; the compiled kernels stay in
Triton's cache on disk, so later starts load them.
"""

from __future__ import annotations

import logging
import time

import torch
from hotmerge_kernels.layout import FlatAdapter
from hotmerge_kernels.merge import merge_adapters
from hotmerge_kernels.merge.params import MergeParams, SignMethod, Strategy

log = logging.getLogger(__name__)

RANK = 16  # a common LoRA rank; the kernels' variants do not depend on it


def warm_up_params(inputs: int, strategy: Strategy) -> list[MergeParams]:
    """The merges that compile ``strategy``'s kernels for ``inputs`` adapters."""
    weights = tuple(1.0 / (i + 1) for i in range(inputs))
    signs = list(SignMethod) if strategy.uses_sign_method else [SignMethod.TOTAL]
    density = 0.5 if strategy.uses_density else 1.0
    return [
        MergeParams(strategy, weights, density=density, sign_method=sign, seed=12345)
        for sign in signs
    ]


def warm_up_merges() -> list[tuple[int, MergeParams]]:
    """(inputs, params) of every warm-up merge."""
    merges = []
    for strategy in Strategy:
        counts = (2,) if strategy.in_delta_space or strategy is Strategy.SLERP else (2, 3)
        merges += [(n, p) for n in counts for p in warm_up_params(n, strategy)]
    return merges


def warm_merge_kernels(
    module_shapes: dict[str, tuple[int, int]], device: torch.device, dtype: torch.dtype
) -> int:
    """Run every warm-up merge on random adapters of ``module_shapes`` ({path: (in, out)});
    returns how many ran (0 off CUDA, where merges run the torch twins: nothing to compile)."""
    if device.type != "cuda":
        return 0
    started = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    adapters = []
    for _ in range(3):
        tensors = {}
        for path, (fan_in, fan_out) in module_shapes.items():
            tensors[(path, "A")] = torch.randn(RANK, fan_in, generator=gen) * 0.01
            tensors[(path, "B")] = torch.randn(fan_out, RANK, generator=gen) * 0.01
        adapters.append(
            FlatAdapter.from_tensors(tensors, rank=RANK, scaling=2.0, dtype=dtype, device=device)
        )
    merges = warm_up_merges()
    for inputs, params in merges:
        merge_adapters(adapters[:inputs], params)
    torch.cuda.synchronize(device)
    del adapters
    torch.cuda.empty_cache()  # its blocks belong to this thread's stream, not the engine's
    seconds = time.perf_counter() - started
    log.info("merge kernels warmed up in %.1f s (%d merges)", seconds, len(merges))
    return len(merges)
