"""Merge kernels on the device at Mistral-7B sizes (run with ``pytest -m gpu``)."""

from __future__ import annotations

import pytest
import torch
from hotmerge_kernels.layout import FlatAdapter, Segment
from hotmerge_kernels.merge import merge_adapters, trim_thresholds
from hotmerge_kernels.params import MergeParams, SignMethod, Strategy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

HIDDEN, INTERMEDIATE, KV, LAYERS = 4096, 14336, 1024, 32
PROJ = {  # name: (in_features, out_features)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, KV),
    "self_attn.v_proj": (HIDDEN, KV),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (HIDDEN, INTERMEDIATE),
    "mlp.up_proj": (HIDDEN, INTERMEDIATE),
    "mlp.down_proj": (INTERMEDIATE, HIDDEN),
}


def mistral_adapter(rank: int, seed: int, dtype=torch.bfloat16, layers: int = LAYERS, skip=()):
    """A random (never zero) adapter with Mistral-7B shapes, built straight into one buffer."""
    segments, offset = [], 0
    for module in sorted(f"model.layers.{i}.{p}" for i in range(layers) for p in PROJ):
        if module.rsplit(".", 1)[-1] in skip:
            continue
        n_in, n_out = PROJ[module.split(".", 3)[-1]]
        for part, shape in (("A", (rank, n_in)), ("B", (n_out, rank))):
            segments.append(Segment(module, part, offset, shape))
            offset += shape[0] * shape[1]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    buffer = torch.randn(offset, generator=gen, device="cuda", dtype=torch.float32) * 0.02
    return FlatAdapter(buffer.to(dtype), tuple(segments), rank=rank, scaling=2.0 - seed / 10)


def close(got, want):
    rtol = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[got.dtype]
    atol = 1e-6 * float(want.float().abs().max())
    diff = (got.float() - want.float()).abs()
    bad = diff > atol + rtol * want.float().abs()
    return int(bad.sum()), float(diff.max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_thresholds_on_device_equal_reference(dtype):
    ads = [mistral_adapter(16, s, dtype, layers=8) for s in range(2)]
    for density in (0.0, 0.05, 0.5):
        got = trim_thresholds(ads, density, backend="triton")
        for a in ads:
            a.cache.clear()
        want = trim_thresholds(ads, density, backend="torch")
        for a in ads:
            a.cache.clear()
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w), density


@pytest.mark.parametrize(
    "strategy",
    [
        Strategy.LINEAR, Strategy.MAGNITUDE_PRUNE, Strategy.TIES, Strategy.DARE_LINEAR,
        Strategy.DARE_TIES, Strategy.CAT, Strategy.SLERP,
    ],
    ids=lambda s: s.value,
)  # fmt: skip
def test_real_size_merge_equals_reference(strategy):
    n = 2 if strategy is Strategy.SLERP else 3
    ads = [mistral_adapter(16, s, skip=("k_proj",) if s == 2 else ()) for s in range(n)]
    params = MergeParams(strategy, (0.6, -0.3, 1.1)[:n], 0.4, SignMethod.TOTAL, seed=2**40 + 5)
    got = merge_adapters(ads, params, backend="triton")
    want = merge_adapters(ads, params, backend="torch")
    assert got.merge_ms > 0
    assert not got.adapter.buffer.isnan().any()
    bad, worst = close(got.adapter.buffer, want.adapter.buffer)
    limit = 1e-6 * got.adapter.buffer.numel() if strategy is Strategy.SLERP else 0
    assert bad <= limit, (bad, worst)


def test_dare_keep_rate_on_device():
    ads = [mistral_adapter(16, s, torch.float32, layers=4) for s in range(2)]
    params = MergeParams(Strategy.DARE_LINEAR, (1.0, 0.0), density=0.3, seed=11)
    out = merge_adapters(ads, params, backend="triton").adapter.buffer
    again = merge_adapters(ads, params, backend="triton").adapter.buffer
    assert torch.equal(out, again)
    n = out.numel()
    kept = int((out != 0).sum())
    assert abs(kept - 0.3 * n) < 5 * (n * 0.21) ** 0.5
