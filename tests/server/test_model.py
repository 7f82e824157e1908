"""The model runner and LoRA layer against PEFT: same greedy tokens, same logprobs."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from hotmerge.generation import FinishReason, GenerationRequest, SamplingParams
from hotmerge.lora import AdapterSlots, LoraLinear, wrap_linears
from hotmerge_kernels.layout import FlatAdapter
from torch import nn

from tests.helpers import ALL_PROJ, make_engine, make_peft_adapter, peft_greedy, tiny_llama

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("model")
    model_dir = tiny_llama(tmp)
    root = tmp / "adapters"
    make_peft_adapter(model_dir, root / "qv", r=4, alpha=8, seed=1, scale=2.0)
    make_peft_adapter(
        model_dir,
        root / "org" / "all",
        r=8,
        alpha=16,
        target_modules=ALL_PROJ,
        seed=2,
        use_rslora=True,
        scale=2.0,
    )
    engine = make_engine(model_dir, root, batch_wait_ms=300, max_batch_size=8)
    yield model_dir, root, engine
    engine.stop()


def generate(engine, adapter_id, n=12, prompt=PROMPT, **params):
    req = GenerationRequest(prompt, SamplingParams(max_new_tokens=n, **params), adapter_id)
    return engine.submit(req).wait()


@pytest.mark.parametrize("adapter_id", [None, "qv", "org/all"])
def test_greedy_matches_peft(setup, adapter_id):
    model_dir, root, engine = setup
    adapter_dir = None if adapter_id is None else root / adapter_id
    want_tokens, want_logprobs = peft_greedy(model_dir, adapter_dir, PROMPT, 12)
    result = generate(engine, adapter_id)
    assert [t.token_id for t in result.tokens] == want_tokens
    assert [t.logprob for t in result.tokens] == pytest.approx(want_logprobs, abs=1e-4)


def test_adapters_change_the_output(setup):
    _, _, engine = setup
    outs = {a: [t.token_id for t in generate(engine, a).tokens] for a in (None, "qv", "org/all")}
    assert len({tuple(v) for v in outs.values()}) == 3


def test_mixed_batch_gives_each_row_what_it_gets_alone(setup):
    _, _, engine = setup
    ids = [None, "qv", "org/all", "qv"]
    prompts = [PROMPT, "hello", "a longer prompt than the others", "x"]
    alone = [generate(engine, a, prompt=p) for a, p in zip(ids, prompts, strict=True)]
    before = engine.stats.prefill_batch_sizes[4]
    handles = [
        engine.submit(GenerationRequest(p, SamplingParams(max_new_tokens=12), a))
        for a, p in zip(ids, prompts, strict=True)
    ]
    together = [h.wait() for h in handles]
    assert engine.stats.prefill_batch_sizes[4] == before + 1  # they ran as one batch
    for a, b in zip(alone, together, strict=True):
        assert [t.token_id for t in b.tokens] == [t.token_id for t in a.tokens]
        assert [t.logprob for t in b.tokens] == pytest.approx(
            [t.logprob for t in a.tokens], abs=1e-4
        )


def test_request_joining_mid_decode_gets_what_it_gets_alone(setup):
    _, _, engine = setup
    alone = generate(engine, "org/all", n=8, prompt="joiner, longer than the first prompt")
    first = engine.submit(GenerationRequest("hi", SamplingParams(max_new_tokens=60), "qv"))
    tokens = iter(first)
    for _ in range(5):  # the first request is decoding now
        next(tokens)
    joined = generate(engine, "org/all", n=8, prompt="joiner, longer than the first prompt")
    rest = list(tokens)
    assert len(rest) == 55
    assert [t.token_id for t in joined.tokens] == [t.token_id for t in alone.tokens]
    assert engine.stats.decode_batch_sizes[2] > 0
    first_alone = generate(engine, "qv", n=60, prompt="hi")
    assert first.result.generated_text == first_alone.generated_text


def test_concurrent_submit_batches(setup):
    _, _, engine = setup
    results = [None] * 3

    def work(i):
        results[i] = generate(engine, ["qv", None, "org/all"][i], n=4)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.generated_tokens == 4 for r in results)
    assert engine.stats.max_batch_size >= 3


def test_module_shapes_cover_all_projections(setup):
    _, _, engine = setup
    shapes = engine.runner.module_shapes()
    assert shapes["model.layers.0.self_attn.q_proj"] == (64, 64)
    assert shapes["model.layers.1.self_attn.k_proj"] == (64, 32)
    assert shapes["model.layers.1.mlp.down_proj"] == (128, 64)
    assert len(shapes) == 14  # 7 projections x 2 layers; lm_head is not wrapped
    assert "lm_head" not in shapes


def test_lora_linear_mixes_rows_like_the_formula():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(6, 5))
    slots = AdapterSlots()
    layers = wrap_linears(model, None, slots)
    assert isinstance(model.proj, LoraLinear) and list(layers) == ["proj"]

    def adapter(r, scaling):
        a, b = torch.randn(r, 6), torch.randn(5, r)
        return (
            FlatAdapter.from_tensors({("proj", "A"): a, ("proj", "B"): b}, rank=r, scaling=scaling),
            a,
            b,
        )

    (fa1, a1, b1), (fa2, a2, b2) = adapter(2, 0.5), adapter(3, 2.0)
    x = torch.randn(4, 3, 6)
    base = model.proj.base(x)
    slots.set([fa1, None, fa2, fa1], "cpu")
    y = model(x)
    assert torch.allclose(y[0], base[0] + 0.5 * x[0] @ a1.T @ b1.T, atol=1e-5)
    assert torch.allclose(y[1], base[1])
    assert torch.allclose(y[2], base[2] + 2.0 * x[2] @ a2.T @ b2.T, atol=1e-5)
    assert torch.allclose(y[3], base[3] + 0.5 * x[3] @ a1.T @ b1.T, atol=1e-5)
    slots.set([fa2] * 4, "cpu")  # one adapter for the whole batch: no row indexing
    assert torch.allclose(model(x), base + 2.0 * x @ a2.T @ b2.T, atol=1e-5)
    slots.clear()
    assert torch.equal(model(x), base)


def test_target_modules_limit_wrapping(setup):
    from hotmerge.model import ModelRunner

    model_dir, _, _ = setup
    runner = ModelRunner(str(model_dir), device="cpu", target_modules=["q_proj", "v_proj"])
    assert sorted({p.rsplit(".", 1)[1] for p in runner.module_shapes()}) == ["q_proj", "v_proj"]
    assert runner.eos_token_ids == frozenset({2})
    assert runner.dtype == torch.float32 and runner.max_position_embeddings == 256


def test_timings_are_filled(setup):
    _, _, engine = setup
    start = time.perf_counter()
    result = generate(engine, "qv", n=3)
    wall = (time.perf_counter() - start) * 1000
    t = result.timings
    assert t.prefill_ms > 0 and t.decode_ms > 0 and t.queue_ms >= 0
    assert t.total_ms <= wall + 1
    assert t.total_ms >= t.prefill_ms


@pytest.mark.gpu
def test_cuda_engine_matches_peft_and_batches(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from hotmerge.embedded import ensure_embedded

    model_dir, root = ensure_embedded(tmp_path)
    engine = make_engine(model_dir, root, device="cuda", dtype="float32", batch_wait_ms=200)
    try:
        for adapter_id in (None, "demo-b", "demo-d"):
            adapter_dir = None if adapter_id is None else root / adapter_id
            want, _ = peft_greedy(model_dir, adapter_dir, PROMPT, 12, device="cuda")
            assert [t.token_id for t in generate(engine, adapter_id).tokens] == want
    finally:
        engine.stop()
    # bf16, the default on CUDA: a mixed batch, sampling and a request joining mid-decode.
    engine = make_engine(model_dir, root, device="cuda", dtype="bfloat16", batch_wait_ms=200)
    try:
        params = dict(do_sample=True, temperature=0.8, top_p=0.9, top_k=40, seed=5)
        handles = [
            engine.submit(GenerationRequest(PROMPT, SamplingParams(max_new_tokens=40, **p), a))
            for a, p in [(None, {}), ("demo-a", params), ("demo-c", {}), ("demo-d", params)]
        ]
        results = [h.wait() for h in handles]
        for r in results:  # a sampled row may draw EOS early
            assert r.generated_tokens == 40 or r.finish_reason is FinishReason.EOS
        assert engine.stats.prefill_batch_sizes[4] == 1
        again = generate(engine, "demo-a", n=40, **params)
        assert [t.token_id for t in again.tokens] == [t.token_id for t in results[1].tokens]
    finally:
        engine.stop()
