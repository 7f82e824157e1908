"""The engine's own forward against transformers, the paged KV cache's bookkeeping, sampling."""

from __future__ import annotations

import math
import time

import pytest
import torch
from hotmerge.embedded import byte_level_tokenizer
from hotmerge.engine import EngineConfig
from hotmerge.engine.batch import DecodeRow, PrefillChunk
from hotmerge.engine.loader import build_runner
from hotmerge.engine.lora import AdapterPool
from hotmerge.engine.models.llama import lora_shapes, module_paths
from hotmerge.engine.sampling import RowSampling, sample
from hotmerge.generation import GenerationRequest, SamplingParams
from hotmerge_kernels.layout import FlatAdapter

from tests.helpers import make_engine, make_peft_adapter, tiny_llama

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SMALL = dict(
    vocab_size=259,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def hf_model(kind: str):
    import transformers

    configs = {
        "llama": lambda: transformers.LlamaConfig(
            **SMALL,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),  # fmt: skip
        "mistral": lambda: transformers.MistralConfig(**SMALL, sliding_window=7),
        "qwen2": lambda: transformers.Qwen2Config(**SMALL),
        "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=24),
    }
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(configs[kind](), dtype=torch.float32)
    for p in model.parameters():  # larger weights than the init: differences show
        p.data.normal_(0, 0.2)
    return model.eval()


def runner_for(model, **config):
    config = EngineConfig(
        max_batch_size=4, block_size=4, kv_cache_tokens=512, max_loras=2, **config
    )
    return build_runner("test", model, byte_level_tokenizer(), config)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("chunk", [None, 5])
def test_forward_logits_equal_transformers(kind, chunk):
    """Prefill (whole or in chunks) and decode logits equal transformers' full forward."""
    model = hf_model(kind)
    with torch.inference_mode():
        ids = torch.randint(3, 259, (1, 19)).tolist()[0]
        want = model(torch.tensor([ids])).logits[0].float()  # (19, vocab)
    runner = runner_for(model)
    assert runner.kind == "llama"
    prompt, steps = ids[:14], ids[14:]
    table = list(range(1, 1 + 5))  # 20 positions in blocks of 4
    size = chunk or len(prompt)
    logits = None
    for start in range(0, len(prompt), size):
        part = prompt[start : start + size]
        last = start + size >= len(prompt)
        logits, _ = runner.prefill([PrefillChunk(0, part, start, table, -1, last)])
    assert torch.allclose(logits[0], want[len(prompt) - 1], atol=1e-4, rtol=1e-4)
    for i, token in enumerate(steps):
        position = len(prompt) + i
        out = runner.decode([DecodeRow(0, token, position, table, -1)])
        assert torch.allclose(out[0], want[position], atol=1e-4, rtol=1e-4), position


def test_prompt_scores_equal_transformers():
    model = hf_model("mistral")
    ids = torch.randint(3, 259, (13,)).tolist()
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    want = [float(logprobs[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    runner = runner_for(model)
    table = [1, 2, 3, 4]
    _, (first,) = runner.prefill([PrefillChunk(0, ids[:6], 0, table, -1, False, True, ids[6])])
    _, (second,) = runner.prefill([PrefillChunk(0, ids[6:], 6, table, -1, True, True)])
    assert first + second == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("kind", ["qwen3", "mistral"])
def test_batched_rows_equal_rows_alone(kind):
    """Prompts prefilled together (two of one length: attended as a batch; one longer than
    Mistral's window) and decode rows of different lengths give what each gives alone."""
    model = hf_model(kind)
    runner = runner_for(model)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22, 23, 24, 25, 26], [30, 31, 32] * 3]
    tables = [[1, 2, 3], [4, 5], [6, 7, 8]]
    chunks = [
        PrefillChunk(i, p, 0, t, -1, True)
        for i, (p, t) in enumerate(zip(prompts, tables, strict=True))
    ]
    together, _ = runner.prefill(chunks)
    for i, chunk in enumerate(chunks):
        alone, _ = runner.prefill([chunk])
        assert torch.allclose(together[i], alone[0], atol=1e-5)
    rows = [
        DecodeRow(i, 40 + i, len(p), t, -1)
        for i, (p, t) in enumerate(zip(prompts, tables, strict=True))
    ]
    together = runner.decode(rows)
    for i, row in enumerate(rows):
        alone = runner.decode([row])  # rewrites the same cache slot with the same values
        assert torch.allclose(together[i], alone[0], atol=1e-5)


def test_unsupported_architecture_runs_eagerly_with_the_same_tokens(tmp_path):
    model_dir = tiny_llama(tmp_path)
    make_peft_adapter(model_dir, tmp_path / "adapters" / "a", r=4, seed=3, scale=2.0)
    outputs = {}
    for eager in (False, True):
        engine = make_engine(model_dir, tmp_path / "adapters", eager_model=eager)
        try:
            assert engine.runner.kind == ("transformers" if eager else "llama")
            params = SamplingParams(max_new_tokens=8, prompt_logprobs=True)
            result = engine.submit(GenerationRequest("hello there", params, "a")).wait()
            outputs[eager] = result
        finally:
            engine.stop()
    ours, theirs = outputs[False], outputs[True]
    assert [t.token_id for t in ours.tokens] == [t.token_id for t in theirs.tokens]
    assert [t.logprob for t in ours.prompt[1:]] == pytest.approx(
        [t.logprob for t in theirs.prompt[1:]], abs=1e-4
    )
    assert math.isnan(ours.prompt[0].logprob) and ours.prompt_tokens == len(ours.prompt)


def write_per_module(pool: AdapterPool, slot: int, adapter: FlatAdapter) -> None:
    """The slot write spelled out one module at a time: the reference of ``pool.write``."""
    ranks = dict.fromkeys(pool.a, 0)
    for group in pool.a:
        pool.a[group][:, slot].zero_()
        pool.b[group][:, slot].zero_()
    for module in adapter.modules:
        group, name, layer = pool.module_paths[module]
        a, b = adapter.tensor(module, "A"), adapter.tensor(module, "B")
        s = pool.slice_of[name]
        lo, hi = pool.offsets[group][s], pool.offsets[group][s + 1]
        pool.a[group][layer, slot, s, : a.shape[0]].copy_(a)
        pool.b[group][layer, slot, : a.shape[0], lo:hi].copy_(b.T.float() * adapter.scaling)
        ranks[group] = max(ranks[group], a.shape[0])
    for group, r in ranks.items():
        pool.ranks[group][slot] = r


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])]
)
@pytest.mark.parametrize(
    "pool_dtype,adapter_dtype",
    [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
     (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
     (torch.float16, torch.float16)],
)  # fmt: skip
def test_slot_write_equals_per_module_write(device, pool_dtype, adapter_dtype):
    """Writing an adapter into a slot (multi-tensor ops, B scaled) gives, bit for bit, what the
    module-by-module write gives, and leaves the other slots alone: modules on every layer (one
    multi-tensor copy), on some layers only (copied by layer index) and on none."""
    model = hf_model("qwen2")
    groups, paths = lora_shapes(model), module_paths(model)
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for path, (group, name, layer) in paths.items():
        if name == "k_proj" or (name == "up_proj" and layer == 0):
            continue  # modules the adapter lacks: their slices stay zero
        fan_in, fan_out = groups[group][name]
        tensors[(path, "A")] = torch.randn(6, fan_in, generator=gen)
        tensors[(path, "B")] = torch.randn(fan_out, 6, generator=gen)
    adapter = FlatAdapter.from_tensors(
        tensors, rank=6, scaling=1.7, dtype=adapter_dtype, device=device
    )
    pools = []
    for _ in range(2):
        pool = AdapterPool(
            groups, paths, num_layers=2, num_slots=3, max_rank=8, dtype=pool_dtype,
            device=torch.device(device),
        )  # fmt: skip
        torch.manual_seed(5)
        for t in (*pool.a.values(), *pool.b.values()):
            t.normal_()  # stale contents of earlier adapters
        pools.append(pool)
    write_per_module(pools[0], 1, adapter)
    pools[1].write(1, adapter)
    for group in groups:
        assert torch.equal(pools[0].a[group], pools[1].a[group]), group
        assert torch.equal(pools[0].b[group], pools[1].b[group]), group
        assert torch.equal(pools[0].ranks[group], pools[1].ranks[group]), group
    assert pools[1].ranks["qkv"][1] == 6 and pools[1].b["qkv"][:, 1].abs().sum() > 0
    assert pools[1].b["gate_up"][1, 1].abs().sum() > 0  # up_proj of layer 1 only


@pytest.fixture(scope="module")
def small_cache_engine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kv")
    model_dir = tiny_llama(tmp)
    engine = make_engine(
        model_dir, tmp / "adapters", max_batch_size=4, kv_cache_tokens=64, block_size=8
    )
    yield engine
    engine.stop()


def request(prompt="hello", **params):
    return GenerationRequest(prompt, SamplingParams(**{"max_new_tokens": 8, **params}))


def test_blocks_are_freed_on_finish_failure_and_cancel(small_cache_engine):
    engine = small_cache_engine
    free = engine.kv.free_blocks
    engine.submit(request()).wait()
    assert engine.kv.free_blocks == free
    handle = engine.submit(request(max_new_tokens=40))
    next(iter(handle))
    handle.cancel()
    deadline = time.monotonic() + 5
    while engine.running_requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.kv.free_blocks == free and engine.kv_cache_usage == 0.0


def test_requests_outgrowing_the_cache_are_preempted_and_all_end(small_cache_engine):
    """Four requests of 40 tokens each, a cache of 64: all start, the latest are preempted as
    the others grow, and each ends with the tokens it gets alone."""
    engine = small_cache_engine
    alone = [engine.submit(request(f"p{i}", max_new_tokens=37)).wait() for i in range(4)]
    before = engine.scheduler.preemptions
    handles = [engine.submit(request(f"p{i}", max_new_tokens=37)) for i in range(4)]
    results = [h.wait() for h in handles]
    assert engine.scheduler.preemptions > before
    assert [[t.token_id for t in r.tokens] for r in results] == [
        [t.token_id for t in r.tokens] for r in alone
    ]
    assert all(r.generated_tokens == 37 for r in results)
    assert engine.kv.free_blocks == engine.kv.capacity_blocks


def test_seeded_sampling_ignores_the_rest_of_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = SamplingParams(do_sample=True, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    row = RowSampling(params, seed=7, index=3)
    other = RowSampling(SamplingParams(), seed=0, index=0)
    alone, _ = sample(logits[1:2], [row])
    mixed, _ = sample(logits, [other, row, other])
    assert mixed[1] == alone[0]
    draws = {sample(logits[1:2], [RowSampling(params, seed=s, index=3)])[0][0] for s in range(40)}
    assert len(draws) > 3  # seeds matter
    kept = torch.topk(logits[1], 20).indices.tolist()
    assert draws <= set(kept)


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    from hotmerge.engine.sampling import apply_repetition_penalty

    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(5))
    logits[0, 3], logits[0, 7], logits[2, 0] = 2.0, -1.0, 0.5  # both signs seen
    rows = [
        RowSampling(SamplingParams(repetition_penalty=1.5), 0, 0, (3, 7, 3, 11)),  # 3 twice
        RowSampling(SamplingParams(), 0, 0, (1, 2)),  # no penalty
        RowSampling(SamplingParams(repetition_penalty=0.8), 0, 0, (0, 39)),
    ]
    got = apply_repetition_penalty(logits, rows)
    want = logits.clone()
    for i, ids, penalty in ((0, [3, 7, 11], 1.5), (2, [0, 39], 0.8)):
        for t in ids:
            v = logits[i, t]
            want[i, t] = v / penalty if v > 0 else v * penalty
    assert torch.equal(got, want)
    assert (got != logits).any(dim=1).tolist() == [True, False, True]


def test_repetition_penalty_reads_a_seen_token_still_on_the_device():
    """A row's token in flight (``seen_pending``: its index among the previous launch's
    tokens) counts as seen, once, whether or not the host's ids have it too."""
    from hotmerge.engine.sampling import apply_repetition_penalty

    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(6))
    previous = torch.tensor([9, 3, 21], dtype=torch.int64)  # the last launch's tokens
    rows = [
        RowSampling(SamplingParams(repetition_penalty=1.5), 0, 0, (3, 7), seen_pending=1),
        RowSampling(SamplingParams(repetition_penalty=2.0), 0, 0, (5,), seen_pending=2),
        RowSampling(SamplingParams(), 0, 0, (), seen_pending=0),  # no penalty: untouched
    ]
    got = apply_repetition_penalty(logits, rows, previous)
    want = apply_repetition_penalty(
        logits,
        [
            RowSampling(SamplingParams(repetition_penalty=1.5), 0, 0, (3, 7)),  # 3 once
            RowSampling(SamplingParams(repetition_penalty=2.0), 0, 0, (5, 21)),
            RowSampling(SamplingParams(), 0, 0, ()),
        ],
    )
    assert torch.equal(got, want) and not torch.equal(got[1], logits[1])
    assert torch.equal(got[2], logits[2])
    with pytest.raises(ValueError, match="in flight"):
        apply_repetition_penalty(logits, rows)


def test_prefill_returns_the_logits_of_the_chunks_that_end_their_prompts():
    """A prefill of chunks some of which end their prompts gives those chunks' logits only, in
    order, each equal to its chunk's prefill alone."""
    runner = runner_for(hf_model("llama"))
    prompts = [[5, 6, 7, 8, 9], [20, 21, 22], [30, 31, 32, 33], [40, 41]]
    ends = [False, True, False, True]
    chunks = [
        PrefillChunk(i, p, 0, [1 + 2 * i, 2 + 2 * i], -1, last)
        for i, (p, last) in enumerate(zip(prompts, ends, strict=True))
    ]
    together, _ = runner.prefill(chunks)
    assert together.shape[0] == 2
    for row, i in enumerate([1, 3]):
        alone, _ = runner.prefill([chunks[i]])
        torch.testing.assert_close(together[row], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("max_batch_size", [1, 2, 4])
def test_warm_up_prefills_fit_the_sequences_a_prefill_takes(max_batch_size):
    """Each warm-up prefill (run on CUDA at start-up) fills its padded size with at most as many
    prompts as a prefill takes: with --max-batch-size 1, four prompts failed the start-up."""
    config = EngineConfig(max_batch_size=max_batch_size, block_size=4, kv_cache_tokens=512)
    runner = build_runner("test", hf_model("llama"), byte_level_tokenizer(), config)
    for size in runner.prefill_sizes:
        chunks = runner._warm_chunks(size)
        assert len(chunks) <= runner.prefill_buffers.max_seqs == max_batch_size
        assert sum(len(c.token_ids) for c in chunks) == size
        runner.prefill(chunks)  # raises if the buffers cannot take them
