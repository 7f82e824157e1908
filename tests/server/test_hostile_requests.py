"""Issue 22, request values and files: one request never harms another; every parameter is
bounded where it enters, on gRPC and HTTP alike; special files and symlink loops under the
adapter root are clean errors; named merges register only what merged. One in-process server
on a tiny Llama (--max-lora-rank 8)."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from hotmerge import cli
from hotmerge.client import HotmergeClient
from hotmerge.engine import sampling
from hotmerge.server import start_server

from tests.helpers import make_peft_adapter, tiny_llama, tiny_server_config

Code = grpc.StatusCode
SPEC = {"ids": ["ad-a", "ad-b"], "weights": [0.5, 0.5]}
MAX_LORA_RANK = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    model_dir = tiny_llama(tmp)
    root = tmp / "adapters"
    make_peft_adapter(model_dir, root / "ad-a", r=4, seed=1)
    make_peft_adapter(model_dir, root / "ad-b", r=4, seed=2)
    make_peft_adapter(model_dir, root / "ad-c", r=6, seed=3)
    make_peft_adapter(model_dir, root / "wide", r=16, seed=4)  # above --max-lora-rank
    (root / "fifo").mkdir()
    os.mkfifo(root / "fifo" / "adapter_config.json")  # a blocking open would hang forever
    (root / "loop").symlink_to(root / "loop")  # a directory that is a symlink loop
    (root / "fileloop").mkdir()
    (root / "fileloop" / "adapter_config.json").symlink_to(root / "fileloop/adapter_config.json")
    config = tiny_server_config(
        tmp, model_dir, root, max_lora_rank=MAX_LORA_RANK, max_batch_size=8,
        default_max_new_tokens=6, max_named_merges=4,
    )  # fmt: skip
    server = start_server(config)
    yield server, root, tmp
    server.stop(0)


@pytest.fixture(scope="module")
def server(setup):
    return setup[0]


@pytest.fixture(scope="module")
def client(server):
    with HotmergeClient(server.target, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http_url, timeout=30) as client:
        yield client


def status(call) -> tuple[Code, str]:
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details()
    return Code.OK, ""


def merge_names(client) -> set[str]:
    return {a.id for a in client.list_adapters() if a.HasField("named_merge")}


# -- sampling: one row's values never fail the batch ------------------------------------------


def test_huge_seeds_and_top_k_sample_beside_other_requests(client, http):
    """Seeds >= 2**63 (valid uint64) and top_k >= 2**63 (HTTP) run, in one batch with others."""

    def plain(i):
        return client.generate("hello", max_new_tokens=6, do_sample=True, seed=i).generated_text

    with ThreadPoolExecutor(8) as pool:
        others = [pool.submit(plain, i) for i in range(4)]
        big = pool.submit(client.generate, "hello", max_new_tokens=6, do_sample=True,
                          seed=2**64 - 1)  # fmt: skip
        huge = {"do_sample": True, "seed": 2**64 - 1, "top_k": 2**63, "max_new_tokens": 6}
        lorax_big = pool.submit(
            http.post, "/generate", json={"inputs": "hello", "parameters": huge}
        )
        oai_big = pool.submit(http.post, "/v1/completions", json={
            "model": "tiny-llama", "prompt": "hello", "seed": 2**63, "max_tokens": 6,
            "temperature": 0.9})  # fmt: skip
        assert all(f.result().strip() is not None for f in others)
        assert big.result().generated_tokens >= 1
        assert lorax_big.result().status_code == 200, lorax_big.result().text
        assert oai_big.result().status_code == 200, oai_big.result().text
    again = client.generate("hello", max_new_tokens=6, do_sample=True, seed=2**64 - 1)
    assert again.generated_text == big.result().generated_text  # the seed's bits, reproducible
    r = http.post("/generate", json={"inputs": "hi", "parameters": {"seed": 2**64}})
    assert r.status_code == 422 and "seed" in r.json()["error"]


def test_a_row_whose_sampling_fails_fails_alone(client, monkeypatch):
    real = sampling.staged_row

    def poisoned(r, vocab):
        if r.seed == 666:
            raise ValueError("poisoned row")
        return real(r, vocab)

    monkeypatch.setattr(sampling, "staged_row", poisoned)
    with ThreadPoolExecutor(6) as pool:
        good = [pool.submit(client.generate, "hi", max_new_tokens=8, do_sample=True, seed=i)
                for i in range(5)]  # fmt: skip
        bad = pool.submit(status, lambda: client.generate("hi", do_sample=True, seed=666))
        code, message = bad.result()
        assert code == Code.INVALID_ARGUMENT and "poisoned row" in message
        assert all(f.result().generated_tokens >= 1 for f in good)


def test_sampler_stages_in_range():
    params = sampling.SamplingParams(do_sample=True, top_k=2**70, temperature=0.5)
    row = sampling.RowSampling(params, seed=2**64 - 1, index=0)
    top_k, seed, *_ = sampling.staged_row(row, vocab=32)
    assert top_k == 32 and seed == -1  # all 64 bits set, as int64
    assert sampling.as_int64(2**63) == -(2**63) and sampling.as_int64(5) == 5


# -- ranks: Merge and LoadAdapter refuse what Generate would ----------------------------------


@pytest.mark.parametrize("svd_rank", [2**31 - 1, 2**32 - 1, 300_000, MAX_LORA_RANK + 1])
def test_svd_rank_is_bounded_before_any_work(client, svd_rank):
    spec = {**SPEC, "merge_strategy": "svd", "svd_rank": svd_rank}
    started = time.monotonic()
    code, message = status(lambda: client.merge(spec))
    assert code == Code.INVALID_ARGUMENT and "svd_rank" in message
    assert time.monotonic() - started < 5


def test_cat_over_the_max_rank_and_wide_adapters_are_refused_and_not_cached(client):
    before = len(client.list_merges().merges)
    spec = {"ids": ["ad-a", "ad-c"], "merge_strategy": "cat"}  # 4 + 6 > 8
    code, message = status(lambda: client.merge(spec, name="too-wide"))
    assert code == Code.INVALID_ARGUMENT and "--max-lora-rank" in message
    assert len(client.list_merges().merges) == before
    assert "too-wide" not in merge_names(client)  # a failed merge registers no name
    code, message = status(lambda: client.load_adapter("wide"))
    assert code == Code.INVALID_ARGUMENT and "--max-lora-rank" in message
    assert not any(a.loaded for a in client.list_adapters() if a.id == "wide")


# -- named merges -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a/../../etc", "../x", "a//b", "x/.hidden", "a" * 129, "é"])
def test_bad_names_are_refused_without_looking(client, name):
    code, message = status(lambda: client.merge(SPEC, name=name))
    assert code == Code.INVALID_ARGUMENT and "name" in message


def test_replacing_a_name_needs_the_flag_and_names_are_bounded(client, http):
    client.merge(SPEC, name="pair")
    client.merge(SPEC, name="pair")  # the same spec again: not a replacement
    other = {"ids": ["ad-a", "ad-b"], "weights": [0.25, 0.75]}
    code, message = status(lambda: client.merge(other, name="pair"))
    assert code == Code.INVALID_ARGUMENT and "replace" in message
    r = http.post("/merges", json={"name": "pair", "merged_adapters": other})
    assert r.status_code == 422 and "replace" in r.json()["error"]
    r = http.post("/merges", json={"name": "pair", "merged_adapters": other, "replace": True})
    assert r.status_code == 200
    client.merge(SPEC, name="pair", replace=True)
    for i in range(4):  # max_named_merges=4 (the fixture)
        code, message = status(lambda i=i: client.merge(SPEC, name=f"bound-{i}"))
    assert code == Code.RESOURCE_EXHAUSTED and "--max-named-merges" in message


# -- files under the adapter root ---------------------------------------------------------------


def test_a_fifo_config_never_blocks_listing_or_loading(client, http):
    def list_all():
        return client.list_adapters(timeout=10), http.get("/v1/models").status_code

    done = ThreadPoolExecutor(1).submit(list_all)
    adapters, code = done.result(timeout=20)
    assert code == 200 and "fifo" not in {a.id for a in adapters}
    for call in (
        lambda: client.load_adapter("fifo"),
        lambda: client.generate("x", adapter_id="fifo"),
    ):
        code, message = status(call)
        assert code in (Code.INVALID_ARGUMENT, Code.NOT_FOUND), message


@pytest.mark.parametrize("adapter_id", ["loop", "fileloop"])
def test_symlink_loops_are_clean_errors(client, adapter_id):
    for call in (
        lambda: client.load_adapter(adapter_id),
        lambda: client.generate("x", adapter_id=adapter_id),
        lambda: client.merge({"ids": [adapter_id, "ad-a"]}),
    ):
        code, message = status(call)
        assert code in (Code.INVALID_ARGUMENT, Code.NOT_FOUND), (code, message)


def test_export_refuses_symlinks_and_the_adapter_root(setup, capsys):
    _, root, tmp = setup
    victim = tmp / "victim"
    victim.mkdir()
    (victim / "adapter_config.json").write_text("keep")
    link = tmp / "link"
    link.symlink_to(victim)
    for out in (link, root / "ad-a", root / "new"):
        rc = cli.main(["export", "ad-a,ad-b", "--out", str(out), "--adapter-root", str(root),
                       "--device", "cpu"])  # fmt: skip
        err = capsys.readouterr().err
        assert rc == 1 and "Traceback" not in err and err.count("\n") == 1, err
    assert (victim / "adapter_config.json").read_text() == "keep"
    assert not (root / "new").exists()
    planted = tmp / "planted"
    planted.mkdir()
    (planted / "adapter_config.json").symlink_to(victim / "adapter_config.json")
    assert cli.main(["export", "ad-a,ad-b", "--out", str(planted), "--adapter-root", str(root),
                     "--device", "cpu"]) == 1  # fmt: skip
    assert (victim / "adapter_config.json").read_text() == "keep"


# -- the CLI ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [["--max-new-tokens", "-1"], ["--top-k=-3"], ["--top-k", "-3"], ["--seed", "-5"]],
)
def test_cli_errors_are_one_line(server, capsys, args):
    rc = cli.main(["generate", "--target", server.target, *args, "hi"])
    err = capsys.readouterr().err
    assert rc in (1, 2) and "Traceback" not in err and err.strip().count("\n") == 0, err


def test_cli_takes_negative_values_and_lists_named_merges(server, client, capsys):
    assert cli.join_negative_values(["--weights", "-1,0.5", "--stream", "-3"]) == [
        "--weights=-1,0.5", "--stream", "-3"]  # fmt: skip
    rc = cli.main(["generate", "--target", server.target, "--merge", "ad-a,ad-b", "--weights",
                   "-1,0.5", "--max-new-tokens", "2", "hi"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    client.merge(SPEC, name="pair", replace=True)
    capsys.readouterr()
    assert cli.main(["adapters", "--target", server.target]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("pair "))
    assert "named merge" in line and "linear(ad-a:0.5, ad-b:0.5)" in line


def test_cli_ctrl_c_is_one_line(server, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(HotmergeClient, "generate", interrupted)
    assert cli.main(["generate", "--target", server.target, "hi"]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_server_still_serves(client):
    threading.Event().wait(0.1)
    assert client.generate("hi", adapter_id="ad-a", max_new_tokens=2).generated_tokens == 2
