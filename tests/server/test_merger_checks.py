"""The merger's refusal of merged adapters that are not finite (on the CPU: the torch twins)."""

from __future__ import annotations

import math

import pytest
import torch
from hotmerge.errors import InvalidArgument
from hotmerge.merging.merger import Merger, _finite
from hotmerge.merging.spec import MergeSpec
from hotmerge_kernels.layout import FlatAdapter
from hotmerge_kernels.merge.params import MergeParams, Strategy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, None])
def test_finite_finds_any_nan_or_infinity(dtype, bad):
    buffer = torch.randn(1000, generator=torch.Generator().manual_seed(3)).to(dtype)
    if bad is not None:
        buffer[617] = bad
    assert _finite(buffer) is (bad is None)
    assert _finite(buffer[:0])  # nothing: nothing infinite


def adapter(seed: int, scale: float) -> FlatAdapter:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in ("layers.0.q_proj", "layers.1.q_proj"):
        tensors[(m, "A")] = torch.randn(4, 32, generator=gen) * scale
        tensors[(m, "B")] = torch.randn(32, 4, generator=gen) * scale
    return FlatAdapter.from_tensors(tensors, rank=4, scaling=1.0, dtype=torch.float16)


@pytest.mark.parametrize("scale,refused", [(1.0, False), (1e4, True)])
def test_a_merge_that_overflows_its_dtype_is_refused(scale, refused):
    """float16 factors near its largest value: a linear merge's sum overflows to infinity."""
    merger = Merger(store=None, cache=None, dtype="float16")
    params = MergeParams(Strategy.LINEAR, weights=(8.0, 8.0))
    spec = MergeSpec(("a", "b"), params)
    inputs = [adapter(1, scale), adapter(2, scale)]
    if refused:
        with pytest.raises(InvalidArgument, match="not finite"):
            merger._merge(spec, inputs, lambda: False, None)
    else:
        merged = merger._merge(spec, inputs, lambda: False, None)
        assert torch.isfinite(merged.buffer).all()
