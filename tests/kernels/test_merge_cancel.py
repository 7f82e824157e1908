"""Merges stop when asked (between chunks), and cat's work is linear in the adapter count."""

from __future__ import annotations

import pytest
import torch
from hotmerge_kernels.merge import MergeCancelled, merge_adapters, reference
from hotmerge_kernels.merge.params import MergeParams, Strategy

from tests.kernels.random_adapters import SMALL_MODULES, make_adapter


@pytest.mark.parametrize("strategy", [Strategy.LINEAR, Strategy.TIES, Strategy.CAT, Strategy.SLERP])
def test_cancel_stops_between_chunks(monkeypatch, strategy):
    # Small chunks so that the merge has many: the cancel is polled between them.
    monkeypatch.setitem(reference._CHUNK, "cpu", 64)
    adapters = [make_adapter(SMALL_MODULES, 4, seed=s) for s in (1, 2)]
    params = MergeParams(strategy, (0.7, 0.4), density=0.5)
    full = merge_adapters(adapters, params, backend="torch").adapter.buffer
    polls = []

    def cancel() -> bool:
        polls.append(1)
        return len(polls) > 3  # let a few chunks run, then stop

    with pytest.raises(MergeCancelled):
        merge_adapters(adapters, params, backend="torch", cancel=cancel)
    assert len(polls) == 4 and full.numel() > 4 * 64  # stopped early, not at the end
    # Never cancelled: the same result as without a cancel callback.
    again = merge_adapters(adapters, params, backend="torch", cancel=lambda: False)
    assert torch.equal(again.adapter.buffer, full)


def test_cat_gathers_each_input_element_once(monkeypatch):
    """cat's work is linear in the adapter count: its chunks cover each input's elements once
    (an engine that scans every input for every chunk covers them N times over)."""
    monkeypatch.setitem(reference._CHUNK, "cpu", 64)
    spans = []
    real = reference._chunks

    def spy(plan, total=None):
        ranges = list(real(plan, total))
        spans.extend(ranges)
        return ranges

    monkeypatch.setattr(reference, "_chunks", spy)
    adapters = [make_adapter(SMALL_MODULES, 4, seed=s) for s in range(50)]
    params = MergeParams(Strategy.CAT, tuple(0.5 for _ in adapters))
    merged = merge_adapters(adapters, params, backend="torch").adapter
    inputs = sum(a.buffer.numel() for a in adapters)
    assert merged.buffer.numel() == inputs  # every module in every adapter: no gaps
    assert sum(e1 - e0 for e0, e1 in spans) == inputs
    assert len(spans) >= len(adapters)  # per input, each in several chunks
