"""Random adapters for the merge engine tests (never zeros; float32 without magnitude ties)."""

from __future__ import annotations

import pytest
import torch
from hotmerge_kernels.backend import INTERPRETING
from hotmerge_kernels.layout import FlatAdapter, Segment

HAS_TRITON = INTERPRETING or torch.cuda.is_available()
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


# Mistral-7B's LoRA targets: {name: (in_features, out_features)}, 32 layers.
HIDDEN, INTERMEDIATE, KV, LAYERS = 4096, 14336, 1024, 32
MISTRAL_7B_PROJ = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, KV),
    "self_attn.v_proj": (HIDDEN, KV),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (HIDDEN, INTERMEDIATE),
    "mlp.up_proj": (HIDDEN, INTERMEDIATE),
    "mlp.down_proj": (INTERMEDIATE, HIDDEN),
}


def mistral_adapter(rank: int, seed: int, dtype=torch.bfloat16, layers: int = LAYERS, skip=()):
    """A random (never zero) adapter with Mistral-7B shapes, built straight into one CUDA buffer."""
    segments, offset = [], 0
    for module in sorted(f"model.layers.{i}.{p}" for i in range(layers) for p in MISTRAL_7B_PROJ):
        if module.rsplit(".", 1)[-1] in skip:
            continue
        n_in, n_out = MISTRAL_7B_PROJ[module.split(".", 3)[-1]]
        for part, shape in (("A", (rank, n_in)), ("B", (n_out, rank))):
            segments.append(Segment(module, part, offset, shape))
            offset += shape[0] * shape[1]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    buffer = torch.randn(offset, generator=gen, device="cuda", dtype=torch.float32) * 0.02
    return FlatAdapter(buffer.to(dtype), tuple(segments), rank=rank, scaling=2.0 - seed / 10)
