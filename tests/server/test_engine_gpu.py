"""On the GPU: the kernels' forward gives transformers' logits, and prefill and decode replayed
from captured CUDA graphs give the eager path's tokens."""

from __future__ import annotations

import pytest
import torch
from hotmerge.engine import AdapterLease
from hotmerge.engine.batch import DecodeRow, PrefillChunk
from hotmerge.generation import GenerationRequest, SamplingParams
from hotmerge_kernels.merge import merge_adapters
from hotmerge_kernels.merge.params import MergeParams, Strategy

from tests.helpers import make_engine
from tests.server.test_engine import hf_model, runner_for

pytestmark = pytest.mark.gpu

ADAPTERS = (None, "demo-a", "demo-b", "demo-c", "demo-d", "merge")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from hotmerge.embedded import ensure_embedded

    return ensure_embedded(tmp_path_factory.mktemp("gpu-engine"))


def generate_all(engine, count: int, max_new_tokens: int = 64) -> list[list[int]]:
    """``count`` requests submitted at once (one batch), mixing base, adapters and a merge.

    Adapters are loaded and the merge made first, so every submit is quick and the batch
    forms within the engine's batch_wait_ms."""
    for adapter_id in ADAPTERS[1:-1]:
        engine.store.get(adapter_id)
    inputs = [engine.store.get(a)[0].weights for a in ("demo-a", "demo-d")]
    ties = MergeParams(Strategy.TIES, weights=(1.0, 0.5), density=0.5)
    merged = merge_adapters(inputs, ties).adapter
    torch.cuda.synchronize()
    handles = []
    for i in range(count):
        which = ADAPTERS[i % len(ADAPTERS)]
        params = SamplingParams(max_new_tokens=max_new_tokens)
        prompt = f"prompt {i}: the quick brown fox"
        if which == "merge":
            handles.append(
                engine.submit(GenerationRequest(prompt, params), lease=AdapterLease(merged))
            )
        else:
            handles.append(engine.submit(GenerationRequest(prompt, params, adapter_id=which)))
    return [[t.token_id for t in h.wait().tokens] for h in handles]


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("chunk", [None, 5])
def test_graph_forward_logits_equal_transformers(kind, chunk):
    """float32 on the GPU (the Triton kernels, replayed graphs): prefill, whole or in chunks
    after a cached prefix, and decode logits equal transformers' full forward."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = hf_model(kind).cuda()
    with torch.inference_mode():
        ids = torch.randint(3, 259, (1, 19)).tolist()[0]
        want = model(torch.tensor([ids], device="cuda")).logits[0].float()
    runner = runner_for(model)
    assert runner._prefill_graphs and runner._graphs
    prompt, steps = ids[:14], ids[14:]
    table = list(range(1, 1 + 5))
    size = chunk or len(prompt)
    logits = None
    for start in range(0, len(prompt), size):
        part = prompt[start : start + size]
        last = start + size >= len(prompt)
        logits, _ = runner.prefill([PrefillChunk(0, part, start, table, -1, last)])
    torch.testing.assert_close(logits[0], want[len(prompt) - 1], atol=1e-3, rtol=1e-3)
    for i, token in enumerate(steps):
        position = len(prompt) + i
        out = runner.decode([DecodeRow(0, token, position, table, -1)])
        torch.testing.assert_close(out[0], want[position], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("batch", [1, 32])
def test_graph_decode_equals_eager_decode(embedded, batch):
    model_dir, root = embedded
    tokens = {}
    for graphs in (True, False):
        engine = make_engine(
            model_dir,
            root,
            device="cuda",
            dtype="bfloat16",
            batch_wait_ms=300,
            max_batch_size=32,
            cuda_graphs=graphs,
        )
        try:
            assert bool(engine.runner._graphs) == graphs
            assert bool(engine.runner._prefill_graphs) == graphs
            tokens[graphs] = generate_all(engine, batch)
            if batch > 1:
                assert engine.stats.max_batch_size == batch
        finally:
            engine.stop()
    assert max(len(t) for t in tokens[True]) == 64  # (a random model's row may draw EOS)
    assert tokens[True] == tokens[False]


def test_the_engine_steps_on_its_own_stream_above_the_merges(embedded, monkeypatch):
    """The worker's forwards and sampling are launched on its stream (priority -1, above the
    merges' 0), not on the legacy default stream the request threads' copies use."""
    model_dir, root = embedded
    engine = make_engine(model_dir, root, device="cuda", dtype="bfloat16", max_batch_size=4)
    try:
        seen = []
        runner = engine.runner
        for name in ("decode", "prefill", "sample"):
            original = getattr(runner, name)

            def spy(*args, _original=original, _name=name):
                seen.append((_name, torch.cuda.current_stream()))
                return _original(*args)

            monkeypatch.setattr(runner, name, spy)
        assert len(generate_all(engine, 3, max_new_tokens=4)) == 3
        stream = engine._worker.stream
        assert stream is not None and stream != torch.cuda.default_stream()
        assert stream.priority < torch.cuda.default_stream().priority
        assert {name for name, _ in seen} == {"decode", "prefill", "sample"}
        assert all(s == stream for _, s in seen)
    finally:
        engine.stop()


def test_steps_planned_ahead_give_the_tokens_of_waiting_first(embedded):
    """With graphs, bf16: the batch's tokens are the same whether each step is launched before
    the one in flight has brought its tokens to the host or after."""
    model_dir, root = embedded
    tokens = {}
    for ahead in (True, False):
        engine = make_engine(
            model_dir, root, device="cuda", dtype="bfloat16", batch_wait_ms=300,
            max_batch_size=32, plan_ahead=ahead,
        )  # fmt: skip
        try:
            tokens[ahead] = generate_all(engine, 32)
            assert (engine.stats.steps_planned_ahead > 0) == ahead
        finally:
            engine.stop()
    assert tokens[True] == tokens[False]


def test_a_slot_write_never_waits_for_the_device(embedded):
    """Admission writes adapters while a step runs: a write that syncs stalls the engine thread
    for the rest of that step (the pool's ranks set by ``[slot] = r`` once did, 30-76 ms)."""
    model_dir, root = embedded
    engine = make_engine(model_dir, root, device="cuda", dtype="bfloat16")
    try:
        pool = engine.runner.adapters
        adapter = engine.store.get("demo-d")[0].weights  # all seven projections
        for r in pool.ranks.values():
            r.zero_()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            pool.write(1, adapter)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        written = {group: r.tolist() for group, r in pool.ranks.items()}
        assert all(r[1] == adapter.rank and r[0] == 0 for r in written.values()), written
    finally:
        engine.stop()
