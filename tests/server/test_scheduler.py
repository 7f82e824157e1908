"""The engine: stopping rules, sampling, cancellation, deadlines, failure isolation, text."""

from __future__ import annotations

import functools
import math
import time

import grpc
import pytest
from hotmerge.embedded import byte_level_tokenizer
from hotmerge.engine.detok import TextStream, text_decoder
from hotmerge.errors import (
    Cancelled,
    DeadlineExceeded,
    HotmergeError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from hotmerge.generation import FinishReason, GenerationRequest, SamplingParams
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import make_engine, make_peft_adapter, tiny_llama

PROMPT = "Once upon a time"
_BYTE_TOKENIZER = byte_level_tokenizer()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sched")
    model_dir = tiny_llama(tmp)
    make_peft_adapter(model_dir, tmp / "adapters" / "qv", r=4, alpha=8, seed=1, scale=2.0)
    engine = make_engine(model_dir, tmp / "adapters", batch_wait_ms=100, max_batch_size=4)
    yield engine
    engine.stop()


def submit(engine, prompt=PROMPT, adapter_id=None, deadline=None, **params):
    params.setdefault("max_new_tokens", 16)
    request = GenerationRequest(prompt, SamplingParams(**params), adapter_id)
    return engine.submit(request, deadline=deadline)


def run(engine, prompt=PROMPT, adapter_id=None, **params):
    return submit(engine, prompt, adapter_id, **params).wait()


def ids(result):
    return [t.token_id for t in result.tokens]


def test_max_new_tokens(engine):
    result = run(engine, max_new_tokens=5)
    assert result.finish_reason is FinishReason.LENGTH
    assert result.generated_tokens == len(result.tokens) == 5
    assert "".join(t.text for t in result.tokens) == result.generated_text


def test_max_new_tokens_up_to_max_total_tokens_runs(engine, monkeypatch):
    """(More is refused by the request path: tests/server/test_request_rules.py.)"""
    prompt_len = len(engine.runner.tokenizer(PROMPT)["input_ids"])
    monkeypatch.setattr(engine, "max_total_tokens", prompt_len + 3)
    result = run(engine, max_new_tokens=3)
    assert result.finish_reason is FinishReason.LENGTH and result.generated_tokens == 3


def test_eos_stops(engine, monkeypatch):
    full = ids(run(engine, max_new_tokens=10))
    eos = full[3]
    monkeypatch.setattr(engine.scheduler, "eos_token_ids", frozenset({eos}))
    result = run(engine, max_new_tokens=10)
    assert result.finish_reason is FinishReason.EOS
    assert ids(result) == full[: full.index(eos) + 1]
    assert result.tokens[-1].text == ""


def test_stop_sequence_spanning_tokens_is_cut(engine):
    full = run(engine, max_new_tokens=24)
    text = full.generated_text
    stop = text[5:8]  # three byte-tokens: the match spans tokens
    assert len(stop) == 3
    result = run(engine, max_new_tokens=24, stop=("never-there", stop))
    assert result.finish_reason is FinishReason.STOP_SEQUENCE
    assert result.generated_text == text[: text.index(stop)]
    assert "".join(t.text for t in result.tokens) == result.generated_text
    assert result.generated_tokens <= 8


def test_row_ended_by_a_stop_sequence_in_flight_takes_no_more_tokens(engine):
    """A stop sequence shows only once the row's next step is launched: that step's token is
    dropped, the other row of the batch runs on as it does alone, and every block comes back."""
    alone = run(engine, max_new_tokens=24)
    stop = alone.generated_text[5:8]
    other = "Another prompt, longer"
    other_alone = run(engine, other, max_new_tokens=24)
    stopped, running = (
        submit(engine, max_new_tokens=24, stop=(stop,)),
        submit(engine, other, max_new_tokens=24),
    )
    first, second = stopped.wait(), running.wait()
    assert first.finish_reason is FinishReason.STOP_SEQUENCE
    assert first.generated_text == alone.generated_text[: alone.generated_text.index(stop)]
    assert ids(first) == ids(alone)[: first.generated_tokens] and len(first.tokens) <= 8
    assert ids(second) == ids(other_alone)
    assert engine.kv_cache_usage == 0


def test_text_stream_multibyte_and_held_back_stop():
    tok = byte_level_tokenizer()
    prompt = tok("x")["input_ids"]
    stream = TextStream(text_decoder(tok), prompt, stop=("ab!",))
    pieces = [stream.push(t) for t in tok("é", add_special_tokens=False)["input_ids"]]
    assert pieces == [("", False), ("é", False)]  # one character from two byte tokens
    assert [stream.push(t) for t in tok("ab", add_special_tokens=False)["input_ids"]] == [
        ("", False),
        ("", False),
    ]  # may start the stop sequence: held back
    assert stream.push(tok("c", add_special_tokens=False)["input_ids"][0]) == ("abc", False)
    out = [stream.push(t) for t in tok("ab!z", add_special_tokens=False)["input_ids"][:3]]
    assert out[-1] == ("", True) and stream.text == "éabc"


def test_seeded_sampling_is_reproducible(engine):
    params = dict(do_sample=True, temperature=1.5, top_k=50, top_p=0.95, max_new_tokens=20)
    a = run(engine, seed=7, **params)
    b = run(engine, seed=7, **params)
    c = run(engine, seed=8, **params)
    assert ids(a) == ids(b) and ids(a) != ids(c)
    assert all(t.logprob <= 0 for t in a.tokens)
    # The seed's stream is the row's own: batching with other rows does not change it.
    handles = [submit(engine, seed=7, **params), submit(engine, seed=9, **params)]
    assert ids(handles[0].wait()) == ids(a)
    handles[1].wait()


def test_top_k_one_is_greedy(engine):
    greedy = run(engine, max_new_tokens=10)
    sampled = run(engine, max_new_tokens=10, do_sample=True, top_k=1, seed=3)
    assert ids(sampled) == ids(greedy)
    assert all(t.logprob == pytest.approx(0.0, abs=1e-6) for t in sampled.tokens)
    assert ids(run(engine, max_new_tokens=10, do_sample=True, temperature=0)) == ids(greedy)


def test_repetition_penalty_changes_greedy(engine):
    plain = ids(run(engine, max_new_tokens=20))
    penalised = ids(run(engine, max_new_tokens=20, repetition_penalty=5.0))
    assert plain != penalised
    assert len(set(penalised)) >= len(set(plain))


def test_cancel_stops_the_row(engine):
    handle = submit(engine, max_new_tokens=200, adapter_id="qv")
    tokens = iter(handle)
    next(tokens)
    handle.cancel()
    with pytest.raises(Cancelled):
        for _ in tokens:
            pass
    time.sleep(0.1)
    assert engine.store.pins("qv") == 0  # its adapter pin was released
    assert run(engine, max_new_tokens=3).generated_tokens == 3  # the worker goes on


def test_deadline_cancels(engine):
    with pytest.raises(DeadlineExceeded, match="deadline"):
        submit(engine, deadline=time.monotonic() - 1).wait()
    handle = submit(engine, max_new_tokens=100, deadline=time.monotonic() + 0.3)
    slow_forward = engine.runner.decode

    def forward(*args, **kwargs):
        time.sleep(0.05)
        return slow_forward(*args, **kwargs)

    engine.runner.decode = forward
    try:
        with pytest.raises(DeadlineExceeded):
            handle.wait()
    finally:
        del engine.runner.decode
    assert run(engine, max_new_tokens=2).generated_tokens == 2


def test_one_failing_request_does_not_fail_the_others(engine, monkeypatch):
    from hotmerge.engine.sequence import Sequence

    real = Sequence.push

    def push(seq, token, logprob):
        if seq.params.seed == 666:
            raise RuntimeError("boom")
        return real(seq, token, logprob)

    monkeypatch.setattr(Sequence, "push", push)
    bad = submit(engine, do_sample=True, seed=666)
    good = submit(engine, do_sample=True, seed=1)
    with pytest.raises(HotmergeError, match="boom") as err:
        bad.wait()
    assert err.value.code == grpc.StatusCode.INTERNAL
    assert good.wait().generated_tokens == 16
    assert engine.stats.requests_failed >= 1


def test_failing_forward_fails_its_batch_and_the_worker_goes_on(engine, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("device on fire")

    monkeypatch.setattr(engine.runner, "decode", broken)
    with pytest.raises(HotmergeError, match="device on fire") as err:
        run(engine)
    assert err.value.code == grpc.StatusCode.INTERNAL
    monkeypatch.undo()
    assert run(engine, max_new_tokens=4).generated_tokens == 4


def test_submit_resolves_the_adapter(engine):
    """The request's rules are checked before the engine (tests/server/test_request_rules.py);
    the engine resolves the adapter at submit."""
    with pytest.raises(NotFound):
        submit(engine, adapter_id="missing")
    assert engine.max_total_tokens == 256 and engine.max_batch_size == 4


@pytest.mark.parametrize("adapter_id", [None, "qv"])
def test_zero_new_tokens_scores_the_prompt_only(engine, adapter_id, monkeypatch):
    """max_new_tokens 0 (with prompt_logprobs): the prompt's logprobs, no token sampled."""
    generating = run(engine, adapter_id=adapter_id, max_new_tokens=2, prompt_logprobs=True)
    sampled = []
    sample = engine.runner.sample

    def counting(logits, rows, *previous):
        sampled.extend(rows)
        return sample(logits, rows, *previous)

    monkeypatch.setattr(engine.runner, "sample", counting)
    scored = run(engine, adapter_id=adapter_id, max_new_tokens=0, prompt_logprobs=True)
    monkeypatch.undo()
    assert not sampled and scored.generated_tokens == 0 and scored.tokens == []
    assert scored.generated_text == "" and scored.finish_reason is FinishReason.LENGTH
    assert scored.prompt_tokens == len(scored.prompt) == len(generating.prompt) > 1
    assert [t.token_id for t in scored.prompt] == [t.token_id for t in generating.prompt]
    got, want = [t.logprob for t in scored.prompt], [t.logprob for t in generating.prompt]
    assert math.isnan(got[0]) and got[1:] == pytest.approx(want[1:], abs=1e-5)
    assert engine.kv.free_blocks == engine.kv.capacity_blocks  # its blocks came back


def test_stop_fails_queued_requests(tmp_path):
    model_dir = tiny_llama(tmp_path)
    engine = make_engine(model_dir, tmp_path / "none")
    handle = submit(engine, max_new_tokens=200)
    engine.stop(timeout=10)
    with pytest.raises((Unavailable, Cancelled)):
        for _ in handle:
            pass
    with pytest.raises(Unavailable):
        submit(engine)


def test_wait_after_iterating_returns_the_result(engine):
    handle = submit(engine, max_new_tokens=4)
    events = list(handle)
    assert handle.wait() is handle.result and len(events) == 4
    assert list(handle) == []


def test_a_lease_of_any_adapter_runs_it(engine):
    """Merged adapters reach the engine as leases of their weights, as named ones do."""
    from hotmerge.engine import AdapterLease

    by_id = run(engine, adapter_id="qv")
    weights = engine.store.get("qv")[0].weights
    request = GenerationRequest(PROMPT, SamplingParams(max_new_tokens=16))
    released = []
    lease = AdapterLease(weights, on_release=lambda: released.append(True))
    given = engine.submit(request, lease=lease).wait()
    assert ids(given) == ids(by_id) != ids(run(engine))
    assert released == [True]  # the lease is given back when the request ends


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="ab é✓", max_size=30),
    stops=st.lists(st.text(alphabet="ab é✓", min_size=1, max_size=3), max_size=3),
)
def test_text_stream_emits_exactly_the_text_up_to_the_first_stop(text, stops):
    tok = _BYTE_TOKENIZER
    stream = TextStream(text_decoder(tok), tok("x")["input_ids"], stops)
    emitted, stopped = "", False
    for token in tok(text, add_special_tokens=False)["input_ids"]:
        piece, stopped = stream.push(token)
        emitted += piece
        if stopped:
            break
    if not stopped:
        emitted += stream.flush()
    # Generation stops as soon as some stop sequence is complete, cut where it begins.
    want = text
    for end in range(1, len(text) + 1):
        hits = [i for s in stops if (i := text[:end].find(s)) >= 0]
        if hits:
            want = text[: min(hits)]
            break
    assert stopped == (want != text or any(s in text for s in stops))
    assert emitted == stream.text == want


def test_cancelled_queued_request_leaves_while_the_batch_is_full(engine):
    running = [submit(engine, max_new_tokens=150) for _ in range(engine.max_batch_size)]
    next(iter(running[0]))  # the batch is full and decoding
    queued = submit(engine, adapter_id="qv", max_new_tokens=5)
    queued.cancel()
    deadline = time.monotonic() + 5
    while engine.store.pins("qv") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.store.pins("qv") == 0
    assert engine.queue_depth == 0
    with pytest.raises(Cancelled):
        queued.wait()
    for handle in running:
        handle.cancel()


def test_engine_limits_are_checked(engine):
    from dataclasses import replace

    from hotmerge.engine import Engine

    runner = engine.runner
    built = runner.config
    with pytest.raises(InvalidArgument, match="max_position_embeddings"):
        Engine(runner, replace(built, max_total_tokens=1000))
    with pytest.raises(InvalidArgument, match="max_input_tokens"):
        Engine(runner, replace(built, max_input_tokens=100, max_total_tokens=100))
    with pytest.raises(InvalidArgument, match="max_batch_size"):
        Engine(runner, replace(built, max_batch_size=built.max_batch_size + 1))
    with pytest.raises(ValueError, match="max_batch_size"):
        replace(built, max_batch_size=0)
    small = Engine(runner, replace(built, max_total_tokens=64))
    assert (small.max_input_tokens, small.max_total_tokens) == (63, 64)


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(0, len(_BYTE_TOKENIZER) - 1), max_size=20))
def test_text_stream_on_the_rust_tokenizer_matches_transformers_decode(ids):
    """The worker's direct call into the Rust tokenizer gives transformers' pieces exactly
    (special tokens skipped, bytes of split characters held)."""
    tok = _BYTE_TOKENIZER
    decode = text_decoder(tok)
    assert decode.func == tok.backend_tokenizer.decode  # the fast path is the one tested
    fast = TextStream(decode, [1, 120], ())
    slow = TextStream(functools.partial(tok.decode, skip_special_tokens=True), [1, 120], ())
    assert [fast.push(t) for t in ids] == [slow.push(t) for t in ids]


def test_text_decoder_keeps_transformers_clean_up():
    tok = byte_level_tokenizer()
    tok.clean_up_tokenization_spaces = True  # transformers rewrites the text: let it
    assert text_decoder(tok).func == tok.decode
