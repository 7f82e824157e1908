"""The model runner and LoRA layer against PEFT: same greedy tokens, same logprobs."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from hotmerge.generation import FinishReason, GenerationRequest, SamplingParams
from hotmerge_kernels.layout import FlatAdapter

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


def test_adapter_pool_mixes_slots_like_the_formula():
    """Each token gets its own slot's ``scaling · x·Aᵀ·Bᵀ``; slot -1 gets nothing; ranks differ."""
    from hotmerge.engine.lora import AdapterPool, LoraBatch
    from hotmerge.engine.slots import SlotTable

    torch.manual_seed(0)
    shapes = {"qkv": {"q_proj": (6, 5), "k_proj": (6, 3), "v_proj": (6, 3)}}
    paths = {f"l0.{n}": ("qkv", n, 0) for n in shapes["qkv"]}
    pool = AdapterPool(
        shapes, paths, num_layers=1, num_slots=2, max_rank=4, dtype=torch.float32, device="cpu"
    )

    def adapter(r, scaling, modules):
        tensors = {}
        for m in modules:
            tensors[(f"l0.{m}", "A")] = torch.randn(r, 6)
            tensors[(f"l0.{m}", "B")] = torch.randn(shapes["qkv"][m][1], r)
        return FlatAdapter.from_tensors(tensors, rank=r, scaling=scaling)

    fa1 = adapter(2, 0.5, ("q_proj", "v_proj"))
    fa2 = adapter(3, 2.0, ("q_proj", "k_proj", "v_proj"))
    table = SlotTable(pool.num_slots)  # the scheduler's: which slot, then the pool writes it
    (s1, fresh1), (s2, fresh2) = table.take(fa1), table.take(fa2)
    assert fresh1 and fresh2 and s1 != s2 and table.take(fa1) == (s1, False)
    pool.write(s1, fa1)
    pool.write(s2, fa2)
    x = torch.randn(4, 6)
    slots = [s1, -1, s2, s1]
    y = torch.randn(4, 11)
    want = y.clone()
    offsets = {"q_proj": (0, 5), "k_proj": (5, 8), "v_proj": (8, 11)}
    for t, fa in enumerate([fa1, None, fa2, fa1]):
        for m in fa.modules if fa is not None else ():
            lo, hi = offsets[m.split(".")[1]]
            a, b = fa.tensor(m, "A"), fa.tensor(m, "B")
            want[t, lo:hi] += fa.scaling * (x[t] @ a.T @ b.T)
    decode = y.clone()
    LoraBatch(pool, torch.tensor(slots, dtype=torch.int32)).apply(0, "qkv", x, decode)
    assert torch.allclose(decode, want, atol=1e-5)
    assert pool.ranks["qkv"].tolist() == [2, 3]
    with pytest.raises(LookupError):  # both slots referenced
        table.take(adapter(1, 1.0, ("q_proj",)))
    table.release(s1)
    table.release(s1)
    s3, fresh = table.take(adapter(1, 1.0, ("q_proj",)))
    assert fresh and s3 == s1  # the idle slot is reused for a new adapter


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_slot_write_by_layer_stacks_equals_module_by_module(pool_dtype):
    """Adapters laid out alike in every layer are written a module name at a time (one strided
    view and one index_copy_ across the layers); the pool ends exactly as writing module by
    module leaves it, for whole adapters, adapters on some modules, float32 into a 16-bit pool,
    a buffer that is a view into a larger one, slots rewritten by other layouts; an adapter with
    ranks varying by layer has no plan."""
    from hotmerge.engine import slot_write
    from hotmerge.engine.lora import AdapterPool

    torch.manual_seed(1)
    shapes = {"qkv": {"q_proj": (6, 5), "k_proj": (6, 3), "v_proj": (6, 3)},
              "down": {"down_proj": (7, 6)}}  # fmt: skip
    paths = {f"model.layers.{i}.{n}": (g, n, i) for i in range(3) for g, ns in shapes.items()
             for n in ns}  # fmt: skip

    def pool():
        return AdapterPool(shapes, paths, num_layers=3, num_slots=2, max_rank=4,
                           dtype=pool_dtype, device="cpu")  # fmt: skip

    def adapter(rank_of, names, layers=range(3), dtype=torch.float32):
        tensors = {}
        for i in layers:
            for ns in shapes.values():
                for n in set(ns) & set(names):
                    r = rank_of(i)
                    tensors[(f"model.layers.{i}.{n}", "A")] = torch.randn(r, ns[n][0])
                    tensors[(f"model.layers.{i}.{n}", "B")] = torch.randn(ns[n][1], r)
        return FlatAdapter.from_tensors(tensors, rank=rank_of(0), scaling=0.5, dtype=dtype)

    every = ("q_proj", "k_proj", "v_proj", "down_proj")
    whole = adapter(lambda i: 4, every, dtype=pool_dtype)
    some = adapter(lambda i: 2, ("q_proj", "v_proj"), layers=(0, 2))
    wide = adapter(lambda i: 3, every)  # float32 into the pool's dtype
    within = torch.cat([torch.randn(5), wide.buffer])[5:]  # a buffer that is a view at offset 5
    wide = FlatAdapter(within, wide.segments, rank=3, scaling=0.5)
    ragged = adapter(lambda i: 1 + i, every)  # rank by layer: no stack plan
    stacked, by_module = pool(), pool()
    assert slot_write.plan(stacked, ragged.segments) is None
    assert len(slot_write.plan(stacked, whole.segments)) == 8  # 4 names, A and B
    for slot, fa in [(0, whole), (1, some), (0, wide), (1, ragged), (1, whole), (0, some)]:
        stacked.write(slot, fa)
        by_module._plans.get(fa.segments, lambda: None)  # no plan: module by module
        by_module.write(slot, fa)
        for name in ("a", "b", "ranks"):
            for group in shapes:
                got, want = getattr(stacked, name)[group], getattr(by_module, name)[group]
                assert torch.equal(got, want), (name, group, slot)
    assert stacked.ranks["qkv"].tolist() == [2, 4] and stacked.ranks["down"].tolist() == [0, 4]


def test_runner_basics(setup):
    _, _, engine = setup
    runner = engine.runner
    assert runner.kind == "llama"
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
