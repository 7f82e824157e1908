"""On the GPU: decode replayed from captured CUDA graphs gives the eager decode's tokens."""

from __future__ import annotations

import pytest
import torch
from hotmerge.generation import GenerationRequest, SamplingParams
from hotmerge_kernels.merge import merge_adapters
from hotmerge_kernels.params import MergeParams, Strategy

from tests.helpers import make_engine

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
            handles.append(engine.submit(GenerationRequest(prompt, params), adapter=merged))
        else:
            handles.append(engine.submit(GenerationRequest(prompt, params, adapter_id=which)))
    return [[t.token_id for t in h.wait().tokens] for h in handles]


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
            limits=dict(cuda_graphs=graphs),
        )
        try:
            assert bool(engine.runner._graphs) == graphs
            tokens[graphs] = generate_all(engine, batch)
            if batch > 1:
                assert engine.stats.max_batch_size == batch
        finally:
            engine.stop()
    assert max(len(t) for t in tokens[True]) == 64  # (a random model's row may draw EOS)
    assert tokens[True] == tokens[False]
