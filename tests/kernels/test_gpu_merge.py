"""Merge kernels on the device at Mistral-7B sizes (run with ``pytest -m gpu``)."""

from __future__ import annotations

import pytest
import torch
from hotmerge_kernels.merge import merge_adapters, trim_thresholds
from hotmerge_kernels.merge.params import MergeParams, SignMethod, Strategy

from tests.kernels.random_adapters import mistral_adapter

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


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
