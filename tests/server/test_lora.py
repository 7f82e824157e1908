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
    for version_reuse in range(2):  # the second call reuses the cached cat + mask
        assert torch.equal(layer(x), mixed), version_reuse

    for i, row in enumerate(rows):
        expected = base(x[i])
        if row is not None and row.segment("layer", "A") is not None:
            expected = expected + row.scaling * (
                (x[i] @ row.tensor("layer", "A").T) @ row.tensor("layer", "B").T
            )
        torch.testing.assert_close(mixed[i], expected, rtol=1e-5, atol=1e-5)

    slots.set([elsewhere, None], "cpu")  # a new composition that leaves this layer alone
    x2 = torch.randn(2, 3, 12)
    torch.testing.assert_close(layer(x2), base(x2))
