"""Steps planned ahead (CPU, float32, tiny model): launching each step before the one in flight
has brought its tokens to the host, the rows reading those tokens on the device, gives every
request exactly what waiting first gives: greedy and seeded sampling, stop sequences, length
limits, repetition penalties, adapters, mixed steps, prefix hits and preemption (where the
worker waits first)."""

from __future__ import annotations

import pytest
from hotmerge.generation import GenerationRequest, SamplingParams

from tests.helpers import make_engine, make_peft_adapter, tiny_llama

PROMPT = "You are a helpful assistant. Answer briefly. Question {}: "


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ahead")
    model_dir = tiny_llama(tmp)
    make_peft_adapter(model_dir, tmp / "adapters" / "qv", r=4, alpha=8, seed=1, scale=2.0)
    return model_dir, tmp / "adapters"


def engines(model, **config):
    """(planned ahead, waiting first): two engines of the same model and settings."""
    model_dir, root = model
    base = dict(max_batch_size=6, block_size=4, max_prefill_tokens=24, batch_wait_ms=30)
    return tuple(
        make_engine(model_dir, root, plan_ahead=ahead, **(base | config)) for ahead in (True, False)
    )


def requests(stop: str = "") -> list[GenerationRequest]:
    sampled = dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.9)
    cases = [
        (None, dict(max_new_tokens=30)),
        ("qv", dict(max_new_tokens=7)),  # ends by its length while the others run
        (None, dict(max_new_tokens=25, seed=5, **sampled)),
        ("qv", dict(max_new_tokens=20, seed=11, **sampled)),
        (None, dict(max_new_tokens=40, stop=[stop] if stop else [])),  # ends mid-flight
        ("qv", dict(max_new_tokens=1)),
    ]
    return [
        GenerationRequest(PROMPT.format(i), SamplingParams(**params), adapter)
        for i, (adapter, params) in enumerate(cases)
    ]


def run(engine, batch: list[GenerationRequest]):
    handles = [engine.submit(r) for r in batch]
    results = [h.wait() for h in handles]
    return [([t.token_id for t in r.tokens], r.finish_reason, r.generated_text) for r in results]


def stopped(*pair) -> None:
    for engine in pair:
        engine.stop()


def test_planned_ahead_steps_give_the_tokens_of_waiting_first(model):
    ahead, first = engines(model)
    try:
        text = run(first, requests()[4:5])[0][2]  # a stop string from the middle of its text
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        assert len(stop) == 3
        got, want = run(ahead, requests(stop)), run(first, requests(stop))
        assert ahead.stats.steps_planned_ahead > 0 and first.stats.steps_planned_ahead == 0
        assert ahead.scheduler.mixed_plans > 0  # prompts joined running rows on the way
        assert got == want
        assert [len(t) for t, _, _ in got][:2] == [30, 7]
        assert any(reason.value == "stop_sequence" for _, reason, _ in got)
        for engine in (ahead, first):
            assert engine.kv.free_blocks == engine.kv.capacity_blocks
            assert not engine.scheduler.running
            assert all(not s.pending for s in engine.scheduler.waiting)
        again = run(ahead, requests(stop))  # prefix hits now, and the same tokens
        assert ahead.kv.hits > 0 and again == want
    finally:
        stopped(ahead, first)


def test_a_repetition_penalty_counts_the_token_in_flight_as_seen(model):
    """A penalised row's seen tokens include the one still on the device (read there), so
    penalised requests are planned ahead too and get the tokens of waiting first."""
    ahead, first = engines(model)
    try:
        batch = requests()
        # Short prompts: the generated tokens, the one in flight among them, weigh in the seen set.
        batch[0] = GenerationRequest(
            "Hi", SamplingParams(max_new_tokens=30, repetition_penalty=3.0)
        )
        batch[2] = GenerationRequest(  # < 1: seen tokens favoured
            "Yo", SamplingParams(max_new_tokens=25, repetition_penalty=0.05)
        )
        batch[3] = GenerationRequest(
            "Ok", SamplingParams(max_new_tokens=20, repetition_penalty=0.5, do_sample=True, seed=3)
        )
        got, want = run(ahead, batch), run(first, batch)
        assert got == want
        planned = ahead.stats.steps_planned_ahead
        alone = run(ahead, batch[:1])  # the penalised request alone: planned ahead as well
        assert ahead.stats.steps_planned_ahead >= planned + 25 and alone[0] == want[0]
        plain = run(first, [GenerationRequest("Hi", SamplingParams(max_new_tokens=30))])
        assert plain[0][0] != want[0][0]  # the penalty changed the tokens
    finally:
        stopped(ahead, first)


def test_preemption_under_planned_ahead_steps_gives_the_same_tokens(model):
    """A cache too small for all: rows are preempted (the worker waits first for the steps
    that must preempt) and every output equals the one the waiting-first engine gives."""
    ahead, first = engines(model, kv_cache_tokens=96, max_batch_size=4, prefix_caching=False)
    try:
        batch = [
            GenerationRequest(f"{PROMPT[:20]} request {i}", SamplingParams(max_new_tokens=30), a)
            for i, a in enumerate([None, "qv", None, "qv"])
        ]
        got, want = run(ahead, batch), run(first, batch)
        assert ahead.scheduler.preemptions > 0 and ahead.stats.steps_planned_ahead > 0
        assert got == want
        assert ahead.kv.free_blocks == ahead.kv.capacity_blocks
    finally:
        stopped(ahead, first)
