"""ΔW-space merges over gRPC against PEFT, export as a PEFT adapter, and ListMerges."""

from __future__ import annotations

import json
import time

import grpc
import pytest
import torch
from hotmerge.cli import main as cli_main
from hotmerge.merging import merger
from hotmerge.merging.export import SPEC_FILE, export_merge
from hotmerge.merging.spec import parse_merge_spec
from hotmerge.v1 import hotmerge_pb2 as pb
from peft.utils import merge_utils

from tests.helpers import peft_greedy, philox_pruning
from tests.server import test_merge_serving as serving
from tests.server.test_merge_serving import PROMPT, TOKENS, spec, token_ids

# The serving tests' fixtures (tiny Llama, adapters ad-a/b/c of rank 4 and ad-r8, a server).
setup, server, client = serving.setup, serving.server, serving.client


def peft_svd_greedy(setup, ids, weights, strategy, density, svd_rank=None, seed=0):
    """Greedy tokens of PEFT after add_weighted_adapter; its DARE mask drawn from hotmerge's
    Philox stream (``philox_pruning``) so that DARE strategies compare exactly."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, model_dir, root = setup
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, root / ids[0], adapter_name=ids[0])
    for adapter_id in ids[1:]:
        model.load_adapter(root / adapter_id, adapter_name=adapter_id)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(merge_utils, "random_pruning", philox_pruning(model, ids, seed))
        model.add_weighted_adapter(
            list(ids), list(weights), "merged", combination_type=strategy, density=density,
            svd_rank=svd_rank,
        )  # fmt: skip
    model.set_adapter("merged")
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.eval().generate(
            **inputs, max_new_tokens=TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


MIXED = ("ad-r8", "ad-a", "ad-b")  # ranks 8, 4, 4


@pytest.mark.parametrize(
    ("strategy", "weights", "density", "svd_rank"),
    [
        ("svd", (1.0, 0.7, -0.5), 1.0, None),
        ("ties_svd", (1.0, 0.8, 0.6), 0.5, None),
        ("ties_svd", (1.0, 0.8, 0.6), 0.5, 6),
        ("magnitude_prune_svd", (0.9, 1.2, 0.5), 0.4, None),
        ("dare_linear_svd", (1.0, 0.5, 0.5), 0.6, None),
        ("dare_ties_svd", (1.0, 0.6, 0.6), 0.5, None),
    ],
)
def test_svd_spec_over_grpc_equals_peft(setup, client, strategy, weights, density, svd_rank):
    extra = {"density": density, "seed": 3}
    if svd_rank is not None:
        extra["svd_rank"] = svd_rank
    reply = client.generate(
        PROMPT,
        merged_adapters=spec(MIXED, weights, strategy.upper(), **extra),
        max_new_tokens=TOKENS,
        details=True,
    )
    expected = peft_svd_greedy(setup, MIXED, weights, strategy, density, svd_rank, seed=3)
    assert token_ids(reply) == expected
    merged = client.merge(spec(MIXED, weights, strategy.upper(), **extra))
    assert merged.cache_hit and merged.rank == (svd_rank or 8)


def test_svd_rank_and_clamp_are_in_the_key(client):
    base = spec(("ad-a", "ad-r8"), (1.0, 1.0), "SVD")
    keys = {
        client.merge(s).merge_key
        for s in (base, {**base, "svd_rank": 3}, {**base, "svd_clamp": 0.9})
    }
    assert len(keys) == 3
    with pytest.raises(grpc.RpcError) as info:
        client.merge({**base, "svd_clamp": 1.5})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "svd_clamp" in info.value.details()


def test_a_delta_space_merge_yields_between_its_chunks(client, monkeypatch):
    """The merge thread hands the GIL to the engine between a ΔW-space merge's chunks (a
    factor-space merge, a millisecond, does not pause); the results stay the same."""
    paused = []
    monkeypatch.setattr(merger, "pause", lambda: paused.append(1))
    monkeypatch.setattr(merger, "YIELD_EVERY_S", 0.0)  # at every poll
    fresh = spec(("ad-a", "ad-r8", "ad-c"), (0.3, 0.9, 0.6), "TIES_SVD", density=0.7, seed=5)
    reply = client.merge(fresh)
    assert not reply.cache_hit and len(paused) >= 2  # once at the start, then between groups
    paused.clear()
    assert not client.merge(spec(("ad-a", "ad-b"), (0.31, 0.77))).cache_hit
    assert paused == []


@pytest.mark.parametrize(
    ("strategy", "ids", "extra"),
    [
        ("ties", ("ad-a", "ad-b", "ad-c"), {"density": 0.5}),
        ("dare_ties", ("ad-a", "ad-b", "ad-c"), {"density": 0.5, "seed": 17}),
        ("cat", ("ad-a", "ad-r8", "ad-b"), {}),
        ("ties_svd", MIXED, {"density": 0.5}),
    ],
)
def test_exported_adapter_in_peft_equals_serving(setup, client, tmp_path, strategy, ids, extra):
    _, model_dir, root = setup
    weights = (1.0, 0.7, -0.6)
    message = spec(ids, weights, strategy.upper(), **extra)
    lines = []
    result = export_merge(
        parse_merge_spec(pb.MergedAdapters(**message)), root, tmp_path / "out", log=lines.append
    )
    assert [line[:5] for line in lines if line.startswith("[")] == ["[1/3]", "[2/3]", "[3/3]"]
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == result.rank == config["lora_alpha"] and not config["use_rslora"]
    assert json.loads((tmp_path / "out" / SPEC_FILE).read_text())["spec"]["strategy"] == strategy

    served = client.generate(PROMPT, merged_adapters=message, max_new_tokens=TOKENS, details=True)
    exported, _ = peft_greedy(model_dir, tmp_path / "out", PROMPT, TOKENS)
    assert token_ids(served) == exported
    base, _ = peft_greedy(model_dir, None, PROMPT, TOKENS)
    assert exported != base


def test_export_cli_prints_a_line_per_step(setup, tmp_path, capsys):
    _, _, root = setup
    argv = ["export", "ad-a,ad-r8", "--strategy", "svd", "--svd-rank", "5", "--out",
            str(tmp_path / "cli"), "--adapter-root", str(root), "--device", "cpu"]  # fmt: skip
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "[1/3]" in out and "[2/3]" in out and "[3/3]" in out and "rank 5" in out
    assert "modules (" in out  # per-module progress of a ΔW-space merge


def test_list_merges_reports_each_cached_merge(client):
    merged = spec(("ad-a", "ad-c"), (0.25, 0.5), "TIES", density=0.7)
    before = time.time()
    first = client.merge(merged)
    client.generate(PROMPT, merged_adapters=merged, max_new_tokens=1)
    client.generate(PROMPT, merged_adapters=merged, max_new_tokens=1)
    reply = client.list_merges()
    entry = next(m for m in reply.merges if m.merge_key == first.merge_key)
    assert entry.affinity_key == first.affinity_key
    assert list(entry.spec.ids) == ["ad-a", "ad-c"]
    assert entry.spec.merge_strategy == pb.TIES and entry.spec.density == pytest.approx(0.7)
    assert entry.rank == first.rank == 4 and entry.bytes == first.bytes > 0
    assert entry.hits == 2 and not entry.in_use and entry.merge_ms > 0
    assert before <= entry.last_used_unix_s <= time.time()
    assert reply.merges[0].merge_key == first.merge_key  # most recently used first
    assert reply.used_bytes >= entry.bytes and reply.budget_bytes >= reply.used_bytes
