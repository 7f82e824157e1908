"""Prefix caching and preemption end to end (CPU, float32, greedy, tiny model): a cache hit
gives the tokens a miss gives, for the base, an adapter and a merge; adapters never share KV;
preempted requests resume without a changed or repeated token; blocks come back on every end;
a request that can never fit is refused at submit; the hit counters reach the metrics."""

from __future__ import annotations

import time

import pytest
from hotmerge.engine import AdapterLease
from hotmerge.errors import HotmergeError, InvalidArgument
from hotmerge.generation import GenerationRequest, SamplingParams
from hotmerge.metrics import Metrics
from hotmerge.server import watch_engine
from hotmerge_kernels.merge import merge_adapters
from hotmerge_kernels.merge.params import MergeParams, Strategy

from tests.helpers import make_engine, make_peft_adapter, tiny_llama

PREFIX = "You are a helpful assistant. Answer briefly. "  # 45 byte tokens: 11 blocks of 4


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prefix")
    model_dir = tiny_llama(tmp)
    for name, seed in (("qv", 1), ("kv2", 2)):
        make_peft_adapter(model_dir, tmp / "adapters" / name, r=4, alpha=8, seed=seed, scale=2.0)
    engine = make_engine(
        model_dir, tmp / "adapters", max_batch_size=4, block_size=4, kv_cache_tokens=512
    )
    yield engine
    engine.stop()


def tokens(engine, prompt, lease_of=None, adapter_id=None, **params) -> list[int]:
    request = GenerationRequest(
        prompt, SamplingParams(**{"max_new_tokens": 12, **params}), adapter_id
    )
    lease = lease_of() if lease_of is not None else None
    return [t.token_id for t in engine.submit(request, lease=lease).wait().tokens]


def merged_lease(engine):
    inputs = [engine.store.get(a)[0].weights for a in ("qv", "kv2")]
    merged = merge_adapters(inputs, MergeParams(Strategy.TIES, weights=(1.0, 0.5), density=0.5))
    return lambda: AdapterLease(merged.adapter)


def uncached(engine, monkeypatch, *args, **kwargs) -> list[int]:
    """The tokens computed with no prefix cache: the reference a hit must equal."""
    with monkeypatch.context() as m:
        m.setattr(engine.kv, "prefix_caching", False)
        return tokens(engine, *args, **kwargs)


@pytest.mark.parametrize("which", ["base", "adapter", "merge"])
def test_a_prefix_hit_gives_the_tokens_of_a_miss(engine, monkeypatch, which):
    kwargs = {
        "base": {},
        "adapter": {"adapter_id": "qv"},
        "merge": {"lease_of": merged_lease(engine) if which == "merge" else None},
    }[which]
    prompt = PREFIX + f"Question ({which}): what is two and two?"
    expected = uncached(engine, monkeypatch, prompt, **kwargs)
    tokens(engine, PREFIX + f"Question ({which}): name a colour.", **kwargs)  # caches PREFIX
    hits = engine.kv.hits
    assert tokens(engine, prompt, **kwargs) == expected
    assert engine.kv.hits - hits >= 40  # PREFIX's full blocks, at least
    hits = engine.kv.hits
    assert tokens(engine, prompt, **kwargs) == expected  # the whole prompt but its last block
    assert engine.kv.hits - hits >= len(prompt) - 4
    assert engine.kv.free_blocks == engine.kv.capacity_blocks


def test_two_adapters_never_share_kv(engine, monkeypatch):
    prompt = PREFIX + "Which adapter answers?"
    expected = uncached(engine, monkeypatch, prompt, adapter_id="kv2")
    tokens(engine, prompt, adapter_id="qv")
    tokens(engine, prompt)  # the base, too
    hits = engine.kv.hits
    assert tokens(engine, prompt, adapter_id="kv2") == expected
    assert engine.kv.hits == hits  # nothing of the others' was reused


def test_preempted_requests_resume_with_the_same_tokens(tmp_path, monkeypatch):
    """Adapters and the base at once in a cache too small for all: the latest admitted are
    preempted (recomputed, partly from their cached blocks) and every output equals the one
    it gets alone; the pool returns to full."""
    model_dir = tiny_llama(tmp_path)
    make_peft_adapter(model_dir, tmp_path / "adapters" / "qv", r=4, alpha=8, seed=1, scale=2.0)
    engine = make_engine(
        model_dir,
        tmp_path / "adapters",
        max_batch_size=4,
        block_size=4,
        kv_cache_tokens=96,
        batch_wait_ms=50,
    )
    try:
        cases = [(f"{PREFIX[:20]} request {i}", "qv" if i % 2 else None) for i in range(4)]
        alone = [
            uncached(engine, monkeypatch, p, adapter_id=a, max_new_tokens=30) for p, a in cases
        ]
        handles = [
            engine.submit(GenerationRequest(p, SamplingParams(max_new_tokens=30), a))
            for p, a in cases
        ]
        together = [[t.token_id for t in h.wait().tokens] for h in handles]
        assert engine.scheduler.preemptions > 0
        assert together == alone
        assert engine.kv.free_blocks == engine.kv.capacity_blocks and engine.kv.usage == 0.0
    finally:
        engine.stop()


def test_blocks_come_back_on_failure(engine, monkeypatch):
    def broken(*args):
        raise RuntimeError("device lost")

    handle = engine.submit(GenerationRequest(PREFIX, SamplingParams(max_new_tokens=8)))
    monkeypatch.setattr(engine.runner, "decode", broken)
    with pytest.raises(HotmergeError, match="device lost"):
        handle.wait()
    monkeypatch.undo()
    deadline = time.monotonic() + 5
    while engine.running_requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.kv.free_blocks == engine.kv.capacity_blocks and engine.kv.usage == 0.0
    assert len(tokens(engine, PREFIX, max_new_tokens=4)) == 4  # and the engine goes on


def test_a_request_that_can_never_fit_is_refused_at_submit(engine):
    too_long = GenerationRequest(PREFIX, SamplingParams(max_new_tokens=512 - len(PREFIX) + 1))
    with pytest.raises(InvalidArgument, match="max_new_tokens"):
        engine.submit(too_long)
    assert engine.queue_depth == 0 and engine.running_requests == 0
    fits = GenerationRequest(PREFIX, SamplingParams(max_new_tokens=4))
    assert engine.submit(fits).wait().generated_tokens == 4


def test_hit_counters_reach_the_metrics(engine):
    metrics = Metrics()
    watch_engine(metrics, engine, engine.store)
    tokens(engine, PREFIX + "first", max_new_tokens=1)
    tokens(engine, PREFIX + "second", max_new_tokens=1)

    def value(name):
        return metrics.registry.get_sample_value(name)

    assert value("hotmerge_prefix_cache_hits_total") == engine.kv.hits > 0
    assert value("hotmerge_prefix_cache_queries_total") == engine.kv.queries >= engine.kv.hits


def test_the_serve_flags_turn_prefix_caching_and_mixed_steps_off():
    from hotmerge.cli import _ENGINE_DEFAULTS, build_parser

    assert _ENGINE_DEFAULTS["prefix_caching"] is True  # on by default
    args = build_parser().parse_args(["serve", "--model", "m", "--no-prefix-caching"])
    assert args.prefix_caching is False
    assert build_parser().parse_args(["serve", "--model", "m"]).prefix_caching is None
    assert _ENGINE_DEFAULTS["mixed_steps"] is True
    args = build_parser().parse_args(["serve", "--model", "m", "--no-mixed-steps"])
    assert args.mixed_steps is False
