"""On the GPU: merges run on a stream of their own (a ΔW-space merge at the lowest priority, a
factor-space one at the engine's) and hand the engine an event; the adapter pool's slot write
waits on it, so the slot holds the finished merge."""

from __future__ import annotations

import pytest
import torch
from hotmerge.engine.lora import AdapterPool
from hotmerge.engine.worker import _engine_stream
from hotmerge.merging import merger as merger_mod
from hotmerge.merging.merger import Merger
from hotmerge.merging.spec import MergeSpec
from hotmerge_kernels.layout import FlatAdapter
from hotmerge_kernels.merge import merge_adapters
from hotmerge_kernels.merge.params import MergeParams, Strategy

pytestmark = pytest.mark.gpu

MODULES = [f"layers.{i}.q_proj" for i in range(4)]


def adapter(seed: int, rank: int = 8, size: int = 512) -> FlatAdapter:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    tensors = {}
    for m in MODULES:
        tensors[(m, "A")] = torch.randn(rank, size, device="cuda", generator=gen) / 10
        tensors[(m, "B")] = torch.randn(size, rank, device="cuda", generator=gen) / 10
    return FlatAdapter.from_tensors(tensors, rank=rank, scaling=2.0, device="cuda")


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


@pytest.mark.parametrize("strategy", [Strategy.TIES, Strategy.TIES_SVD])
def test_a_merge_runs_on_its_own_stream_and_records_its_event(cuda, monkeypatch, strategy):
    inputs = [adapter(1), adapter(2), adapter(3)]
    params = MergeParams(strategy, weights=(1.0, 0.7, 0.4), density=0.5)
    streams = []

    def recording(*args, **kwargs):
        streams.append(torch.cuda.current_stream())
        return merge_adapters(*args, **kwargs)

    monkeypatch.setattr(merger_mod, "merge_adapters", recording)
    merger = Merger(store=None, cache=None, dtype="float32")
    spec = MergeSpec(("a", "b", "c"), params)
    torch.cuda.synchronize()  # inputs complete, as the store's blocking copy leaves them
    # The last input is rewritten late on a side stream: the merge waits for its event.
    side = torch.cuda.Stream(priority=0)
    side.wait_stream(torch.cuda.current_stream())
    expected_inputs = [
        *inputs[:2],
        FlatAdapter(inputs[2].buffer * 2, inputs[2].segments, rank=8, scaling=2.0),
    ]
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # tens of ms
        late = FlatAdapter(inputs[2].buffer * 2, inputs[2].segments, rank=8, scaling=2.0)
        late.ready_event = side.record_event()
    inputs[2] = late
    merged = merger._merge(spec, inputs, lambda: False, None)
    (stream,) = streams
    assert stream != torch.cuda.default_stream()
    # A ΔW-space merge yields to decode; a factor-space one runs at the engine's priority.
    engine_priority = _engine_stream(torch.device("cuda")).priority
    assert stream.priority == (0 if strategy.in_delta_space else engine_priority)
    assert merged.ready_event is not None and merged.ready_event.query()
    expected = merge_adapters(expected_inputs, params).adapter
    torch.testing.assert_close(merged.buffer, expected.buffer)


def test_the_slot_write_waits_for_the_merge(cuda):
    """An adapter written late on a side stream, its event recorded: the pool's slot write on
    the engine's (default) stream copies the finished values."""
    pool = AdapterPool(
        {"qkv": {"q_proj": (512, 512)}},
        {m: ("qkv", "q_proj", i) for i, m in enumerate(MODULES)},
        num_layers=len(MODULES),
        num_slots=2,
        max_rank=8,
        dtype=torch.float32,
        device=torch.device("cuda"),
    )
    source = adapter(4)
    side = torch.cuda.Stream(priority=0)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # tens of ms: the default stream would run ahead
        late = FlatAdapter(source.buffer * 3, source.segments, rank=8, scaling=2.0)
        late.ready_event = side.record_event()
    slot = 1
    pool.write(slot, late)
    for i, m in enumerate(MODULES):
        a = source.tensor(m, "A") * 3
        b = source.tensor(m, "B") * 3 * 2.0
        torch.testing.assert_close(pool.a["qkv"][i, slot, 0], a)
        torch.testing.assert_close(pool.b["qkv"][i, slot], b.T)
