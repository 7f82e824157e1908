"""Random adapters for the merge engine tests (never zeros; float32 without magnitude ties)."""

from __future__ import annotations

import os

import pytest
import torch
from hotmerge_kernels.layout import FlatAdapter

HAS_TRITON = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs CUDA or TRITON_INTERPRET=1")


def make_adapter(
    modules: dict[str, tuple[int, int]],
    rank: int,
    *,
    seed: int,
    scaling: float = 2.0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> FlatAdapter:
    """``modules``: {path: (in_features, out_features)}; entries drawn from a normal law."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (n_in, n_out) in modules.items():
        tensors[(module, "A")] = torch.randn(rank, n_in, generator=gen) * 0.3
        tensors[(module, "B")] = torch.randn(n_out, rank, generator=gen) * 0.3
    return FlatAdapter.from_tensors(tensors, rank=rank, scaling=scaling, dtype=dtype, device=device)


SMALL_MODULES = {
    "model.layers.0.self_attn.q_proj": (37, 37),
    "model.layers.0.self_attn.v_proj": (37, 11),
    "model.layers.0.mlp.down_proj": (53, 37),
}
