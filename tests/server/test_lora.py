"""LoraLinear's mixed-batch path (concatenated ranks + row mask) against the plain formula."""

from __future__ import annotations

import torch
from hotmerge.lora import AdapterSlots, LoraLinear
from hotmerge_kernels.layout import FlatAdapter
from torch import nn


def adapter(module: str, rank: int, scaling: float, seed: int, fan=(12, 10)) -> FlatAdapter:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        (module, "A"): torch.randn(rank, fan[0], generator=g),
        (module, "B"): torch.randn(fan[1], rank, generator=g),
    }
    return FlatAdapter.from_tensors(tensors, rank=rank, scaling=scaling)


def test_mixed_batch_equals_each_row_alone():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    slots = AdapterSlots()
    layer = LoraLinear(base, "layer", slots)
    a = adapter("layer", 4, 2.0, 1)
    b = adapter("layer", 8, 0.5, 2)  # another rank, as a cat-merged adapter has
    elsewhere = adapter("other", 4, 1.0, 3)  # touches another layer only
    rows = [a, None, b, a, elsewhere, b]
    x = torch.randn(len(rows), 3, 12)

    slots.set(rows, "cpu")
    assert len(slots.groups) > 1
    mixed = layer(x)
    cached = layer._mixed
    assert torch.equal(layer(x), mixed)  # the same batch again: the cached cat is reused

    def alone(row, xi):
        expected = base(xi)
        if row is not None and row.segment("layer", "A") is not None:
            expected = expected + row.scaling * (
                (xi @ row.tensor("layer", "A").T) @ row.tensor("layer", "B").T
            )
        return expected

    for i, row in enumerate(rows):
        torch.testing.assert_close(mixed[i], alone(row, x[i]), rtol=1e-5, atol=1e-5)

    # Rows reordered, one finished: the same adapter set keeps the cached concatenation.
    shuffled = [b, elsewhere, a, None, a]
    slots.set(shuffled, "cpu")
    x3 = torch.randn(len(shuffled), 2, 12)
    out = layer(x3)
    assert layer._mixed is cached
    for i, row in enumerate(shuffled):
        torch.testing.assert_close(out[i], alone(row, x3[i]), rtol=1e-5, atol=1e-5)

    slots.set([elsewhere, None], "cpu")  # a new composition that leaves this layer alone
    x2 = torch.randn(2, 3, 12)
    torch.testing.assert_close(layer(x2), base(x2))
