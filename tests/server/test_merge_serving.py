"""Inline merge specs over real gRPC: PEFT equivalence, determinism, single flight, eviction."""

from __future__ import annotations

import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from hotmerge.client import HotmergeClient
from hotmerge.config import ServerConfig
from hotmerge.merging.spec import affinity_key
from hotmerge.server import start_server

from tests.helpers import make_peft_adapter, peft_greedy, tiny_llama, tiny_server_config

Code = grpc.StatusCode
PROMPT = "the merged adapter says"
TOKENS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge")
    model_dir = tiny_llama(tmp)
    root = tmp / "adapters"
    # Same rank, different target modules and alphas (partially overlapping).
    make_peft_adapter(model_dir, root / "ad-a", r=4, alpha=8, seed=1, scale=2.0)
    make_peft_adapter(
        model_dir,
        root / "ad-b",
        r=4,
        alpha=16,
        target_modules=("q_proj", "o_proj"),
        seed=2,
        scale=2.0,
    )
    make_peft_adapter(
        model_dir,
        root / "ad-c",
        r=4,
        alpha=4,
        target_modules=("v_proj", "up_proj"),
        seed=3,
        scale=2.0,
    )
    make_peft_adapter(model_dir, root / "ad-r8", r=8, alpha=8, seed=4, scale=2.0)
    return tmp, model_dir, root


def config(setup, **overrides) -> ServerConfig:
    tmp, model_dir, root = setup
    base = dict(max_batch_size=8, default_max_new_tokens=TOKENS, max_workers=48)
    return tiny_server_config(tmp, model_dir, root, **{**base, **overrides})


@pytest.fixture(scope="module")
def server(setup):
    running = start_server(config(setup, http_port=0))
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def client(server):
    with HotmergeClient(server.target, timeout=120) as client:
        yield client


def metric(server, name: str, **labels) -> float:
    return server.metrics.registry.get_sample_value(name, labels) or 0.0


def merges_run(server) -> float:
    return metric(server, "hotmerge_cache_misses_total", cache="merge")


def peft_merged_greedy(setup, ids, weights, strategy, density=1.0, sign="total") -> list[int]:
    """Greedy tokens of a PEFT model after add_weighted_adapter with the same settings."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, model_dir, root = setup
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, root / ids[0], adapter_name=ids[0])
    for adapter_id in ids[1:]:
        model.load_adapter(root / adapter_id, adapter_name=adapter_id)
    model.add_weighted_adapter(
        list(ids),
        list(weights),
        "merged",
        combination_type=strategy,
        density=density,
        majority_sign_method=sign,
    )
    model.set_adapter("merged")
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.eval().generate(
            **inputs, max_new_tokens=TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def spec(ids, weights, strategy="LINEAR", **extra) -> dict:
    return {"ids": list(ids), "weights": list(weights), "merge_strategy": strategy, **extra}


def token_ids(reply) -> list[int]:
    return [t.id for t in reply.tokens]


@pytest.mark.parametrize(
    ("strategy", "ids", "weights", "density"),
    [
        ("linear", ("ad-a", "ad-b", "ad-c"), (1.0, 0.7, -0.5), 1.0),
        ("ties", ("ad-a", "ad-b", "ad-c"), (1.0, 0.8, 0.6), 0.5),
        ("magnitude_prune", ("ad-a", "ad-b"), (0.9, 1.2), 0.4),
        ("cat", ("ad-a", "ad-r8", "ad-b"), (1.0, 0.5, -0.7), 1.0),
    ],
)
def test_inline_spec_equals_peft_add_weighted_adapter(
    setup, client, strategy, ids, weights, density
):
    reply = client.generate(
        PROMPT,
        merged_adapters=spec(ids, weights, strategy.upper(), density=density),
        max_new_tokens=TOKENS,
        details=True,
    )
    expected = peft_merged_greedy(setup, ids, weights, strategy, density)
    assert token_ids(reply) == expected
    # The merge changed the output: the base model says something else.
    base, _ = peft_greedy(setup[1], None, PROMPT, TOKENS)
    assert expected != base
    assert reply.merge.merge_key.startswith("m-") and reply.merge.affinity_key.startswith("a-")


def test_merge_info_timings_and_metadata(client):
    merged = spec(("ad-a", "ad-c"), (0.3, 0.9), "TIES", density=0.6)
    call = client._stub.Generate.with_call  # noqa: SLF001 - to read the response metadata
    from hotmerge.client import generate_request, request_metadata

    request = generate_request(PROMPT, merged_adapters=merged, max_new_tokens=2)
    first, rpc = call(request, metadata=request_metadata(request), timeout=60)
    headers = dict(rpc.initial_metadata())
    assert headers["x-merge-key"] == affinity_key(request.merged_adapters)
    assert headers["x-merge-key"] == first.merge.affinity_key
    assert headers["x-merge-cache-key"] == first.merge.merge_key
    assert not first.merge.cache_hit and first.timings.merge_ms > 0
    second = client.generate(PROMPT, merged_adapters=merged, max_new_tokens=2)
    assert second.merge.cache_hit and second.timings.merge_ms == 0
    assert second.merge.merge_key == first.merge.merge_key
    assert token_ids(second) == token_ids(first)


def test_merge_rpc_warms_the_cache(server, client):
    merged = spec(("ad-b", "ad-c"), (1.0, 0.25), "DARE_LINEAR", density=0.5, seed=11)
    before = merges_run(server)
    cold = client.merge(merged)
    warm = client.merge(merged)
    assert not cold.cache_hit and cold.merge_ms > 0 and cold.rank == 4
    assert warm.cache_hit and warm.merge_ms == 0 and warm.merge_key == cold.merge_key
    assert cold.bytes == warm.bytes > 0
    assert merges_run(server) == before + 1
    reply = client.generate(PROMPT, merged_adapters=merged, max_new_tokens=2)
    assert reply.merge.cache_hit and reply.merge.merge_key == cold.merge_key
    assert metric(server, "hotmerge_merge_seconds_count", strategy="dare_linear") >= 1


def test_identity_spec_is_the_adapter_itself(server, client):
    before = merges_run(server)
    merged = client.generate(PROMPT, merged_adapters=spec(["ad-a"], [1.0]), details=True)
    named = client.generate(PROMPT, adapter_id="ad-a", details=True)
    assert token_ids(merged) == token_ids(named)
    assert merges_run(server) == before


def test_dare_gives_the_same_text_on_two_servers(setup, client):
    merged = spec(("ad-a", "ad-b", "ad-c"), (1.0, 0.6, 0.6), "DARE_TIES", density=0.5, seed=7)
    here = client.generate(PROMPT, merged_adapters=merged, details=True)
    with (
        start_server(config(setup)) as other,
        HotmergeClient(other.target, timeout=120) as other_client,
    ):
        there = other_client.generate(PROMPT, merged_adapters=merged, details=True)
    assert token_ids(here) == token_ids(there) and here.generated_text == there.generated_text
    assert here.merge.merge_key == there.merge.merge_key
    reseeded = client.generate(PROMPT, merged_adapters={**merged, "seed": 8}, details=True)
    assert reseeded.merge.merge_key != here.merge.merge_key


def test_32_concurrent_requests_with_one_new_spec_merge_once(server, client):
    merged = spec(("ad-a", "ad-b"), (0.41, 0.77), "TIES", density=0.3)
    merges_before = merges_run(server)
    hits_before = metric(server, "hotmerge_cache_hits_total", cache="merge")
    waits_before = metric(server, "hotmerge_cache_waits_total", cache="merge")
    with ThreadPoolExecutor(32) as pool:
        replies = list(
            pool.map(
                lambda _: client.generate(PROMPT, merged_adapters=merged, max_new_tokens=3),
                range(32),
            )
        )
    assert merges_run(server) == merges_before + 1
    assert len({r.merge.merge_key for r in replies}) == 1
    assert len({r.generated_text for r in replies}) == 1
    hits = metric(server, "hotmerge_cache_hits_total", cache="merge") - hits_before
    waits = metric(server, "hotmerge_cache_waits_total", cache="merge") - waits_before
    assert hits + waits == 31
    assert sum(not r.merge.cache_hit for r in replies) == 1 + waits


def test_small_merge_budget_evicts_and_every_request_succeeds(setup):
    one_merge = 2 * 4 * 4 * (64 * 2 + 64 * 2)  # generous bound of one merged ad-a/ad-b (fp32)
    with (
        start_server(config(setup, merge_budget_bytes=3 * one_merge)) as small,
        HotmergeClient(small.target, timeout=120) as c,
    ):
        specs = [spec(("ad-a", "ad-b"), (1.0, 0.1 * (i + 1))) for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            replies = list(
                pool.map(lambda s: c.generate(PROMPT, merged_adapters=s, max_new_tokens=2), specs)
            )
        assert all(r.generated_tokens == 2 for r in replies)
        assert len({r.merge.merge_key for r in replies}) == 8
        assert merges_run(small) == 8
        assert metric(small, "hotmerge_cache_evictions_total", cache="merge") >= 5
        assert metric(small, "hotmerge_merged_adapter_bytes") <= 3 * one_merge


def test_incompatible_ranks_name_the_adapters_and_the_fix(client):
    with pytest.raises(grpc.RpcError) as info:
        client.generate(PROMPT, merged_adapters=spec(("ad-a", "ad-r8"), (1, 1), "TIES"))
    assert info.value.code() == Code.INVALID_ARGUMENT
    assert "ad-r8 (rank 8)" in info.value.details() and "CAT" in info.value.details()
    assert client.generate(PROMPT, adapter_id="ad-a", max_new_tokens=1).generated_tokens == 1


def test_metrics_endpoint_serves_the_counters(server, client):
    client.generate(PROMPT, merged_adapters=spec(("ad-a", "ad-c"), (1, 1)), max_new_tokens=1)
    url = f"http://127.0.0.1:{server.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    for name in (
        'hotmerge_requests_total{code="OK",method="Generate"}',
        'hotmerge_cache_misses_total{cache="merge"}',
        "hotmerge_merge_seconds_bucket",
        "hotmerge_adapter_bytes",
        "hotmerge_merged_adapter_bytes",
        "hotmerge_adapters_loaded",
        "hotmerge_queue_depth",
        "hotmerge_generated_tokens_total",
    ):
        assert name in text, name
    assert metric(server, "hotmerge_requests_total", method="Generate", code="NOT_FOUND") >= 0
    assert metric(server, "hotmerge_adapters_loaded") >= 3
