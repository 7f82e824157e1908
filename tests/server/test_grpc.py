"""The gRPC service end to end: a server started in-process on a free loopback port, a tiny
Llama, PEFT adapters, and the Python clients (sync and asyncio) over real gRPC."""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from hotmerge import __version__, request_rules
from hotmerge.api.grpc_messages import generation_request
from hotmerge.client import AsyncHotmergeClient, HotmergeClient, generate_request, request_metadata
from hotmerge.config import ServerConfig
from hotmerge.errors import InvalidArgument
from hotmerge.merging.spec import affinity_key
from hotmerge.request_rules import RequestLimits
from hotmerge.server import SERVICE_NAME, open_port, start_server
from hotmerge.v1 import hotmerge_pb2 as pb
from hotmerge.v1 import hotmerge_pb2_grpc as pb_grpc

from tests.helpers import make_peft_adapter, peft_greedy, tiny_llama, tiny_server_config

PROMPT = "Once upon a time"
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpc")
    model_dir = tiny_llama(tmp)
    root = tmp / "adapters"
    make_peft_adapter(model_dir, root / "ad-a", r=4, alpha=8, seed=1, scale=2.0)
    make_peft_adapter(
        model_dir,
        root / "ad-b",
        r=4,
        alpha=16,
        target_modules=("o_proj", "up_proj"),
        seed=2,
        scale=2.0,
    )
    other = tiny_llama(tmp, name="other-llama", hidden_size=32, intermediate_size=64)
    make_peft_adapter(other, root / "wrong-base", r=4, seed=3)
    config = tiny_server_config(
        tmp,
        model_dir,
        root,
        max_batch_size=4,
        max_input_tokens=64,
        default_max_new_tokens=16,
        max_workers=16,
    )
    server = start_server(config)
    yield server, model_dir, root
    server.stop(0)


@pytest.fixture(scope="module")
def server(setup):
    return setup[0]


@pytest.fixture(scope="module")
def client(server):
    with HotmergeClient(server.target, timeout=60) as client:
        yield client


def ids(reply) -> list[int]:
    return [t.id for t in reply.tokens]


def decode_steps(engine) -> int:
    return sum(engine.stats.decode_batch_sizes.values())


def wait_for(condition, timeout=5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def assert_engine_idle(engine, failed_before: int, max_steps_after: int) -> None:
    """The request's row left the batch (failed as cancelled) and no decode work goes on."""
    assert wait_for(lambda: engine.stats.requests_failed > failed_before)
    steps = decode_steps(engine)
    time.sleep(0.2)
    assert decode_steps(engine) == steps  # nothing is generating any more
    assert steps < max_steps_after


# -- generation -------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ["ad-a", "ad-b", None])
def test_greedy_generate_matches_peft(setup, client, adapter):
    server, model_dir, root = setup
    reply = client.generate(PROMPT, adapter_id=adapter, max_new_tokens=12, details=True)
    expected, expected_logprobs = peft_greedy(
        model_dir, root / adapter if adapter else None, PROMPT, 12
    )
    assert ids(reply) == expected
    assert [t.logprob for t in reply.tokens] == pytest.approx(expected_logprobs, abs=1e-3)
    assert reply.generated_tokens == len(expected)
    assert reply.finish_reason in (pb.LENGTH, pb.EOS)
    assert reply.generated_text == "".join(t.text for t in reply.tokens)
    if adapter is not None:  # the adapter really changes the output, so the match means something
        base = client.generate(PROMPT, max_new_tokens=12, details=True)
        assert ids(base) != ids(reply)


def test_timings_are_reported(client):
    reply = client.generate(PROMPT, adapter_id="ad-a", max_new_tokens=4)
    t = reply.timings
    assert t.prefill_ms > 0 and t.decode_ms > 0 and t.queue_ms >= 0 and t.merge_ms == 0
    assert t.total_ms >= t.prefill_ms + t.decode_ms
    assert not reply.tokens  # details off


def test_stream_matches_generate(client):
    reply = client.generate(PROMPT, adapter_id="ad-a", max_new_tokens=10, details=True)
    messages = list(client.generate_stream(PROMPT, adapter_id="ad-a", max_new_tokens=10))
    *tokens, final = messages
    assert final.done and not final.HasField("token")
    assert not any(m.done for m in tokens)
    assert [m.token.id for m in tokens] == ids(reply)
    assert "".join(m.text for m in tokens) == final.generated_text == reply.generated_text
    assert final.generated_tokens == reply.generated_tokens == len(tokens)
    assert final.finish_reason == reply.finish_reason
    assert final.timings.total_ms > 0


def test_sampling_is_reproducible_with_a_seed(client):
    # A temperature alone turns sampling on (as in LoRAX); the seed makes it repeatable.
    a = client.generate(PROMPT, temperature=0.9, top_k=50, seed=7, max_new_tokens=8, details=True)
    b = client.generate(PROMPT, temperature=0.9, top_k=50, seed=7, max_new_tokens=8, details=True)
    assert ids(a) == ids(b)


def test_stop_sequence(client):
    full = client.generate(PROMPT, max_new_tokens=16).generated_text
    stop = full[6:8]
    reply = client.generate(PROMPT, max_new_tokens=16, stop=[stop])
    assert reply.finish_reason == pb.STOP_SEQUENCE
    assert reply.generated_text == full[: full.index(stop)]


def test_default_max_new_tokens(client):
    reply = client.generate(PROMPT)
    assert reply.generated_tokens == 16 or reply.finish_reason == pb.EOS


def test_concurrent_requests_with_different_adapters(client):
    adapters = ["ad-a", "ad-b", None, "ad-a", "ad-b", None]
    solo = {
        a: ids(client.generate(PROMPT, adapter_id=a, max_new_tokens=8, details=True))
        for a in set(adapters)
    }
    with ThreadPoolExecutor(len(adapters)) as pool:
        replies = list(
            pool.map(
                lambda a: client.generate(PROMPT, adapter_id=a, max_new_tokens=8, details=True),
                adapters,
            )
        )
    assert [ids(r) for r in replies] == [solo[a] for a in adapters]


def test_async_client(server):
    async def run():
        async with AsyncHotmergeClient(server.target, timeout=60) as client:
            reply = await client.generate(PROMPT, adapter_id="ad-a", max_new_tokens=6)
            stream = [
                m async for m in client.generate_stream(PROMPT, adapter_id="ad-a", max_new_tokens=6)
            ]
            info = await client.info()
            adapters = await client.list_adapters()
            loaded = await client.load_adapter("ad-b")
            unloaded = await client.unload_adapter("ad-b")
            return reply, stream, info, adapters, loaded, unloaded

    reply, stream, info, adapters, loaded, unloaded = asyncio.run(run())
    assert stream[-1].done and stream[-1].generated_text == reply.generated_text
    assert info.version == __version__
    assert {"ad-a", "ad-b"} <= {a.id for a in adapters}
    assert loaded.adapter.loaded and unloaded


# -- errors -----------------------------------------------------------------------------------

ERROR_CASES = [
    # (generate kwargs, status, text the message must contain)
    (dict(inputs=""), Code.INVALID_ARGUMENT, "inputs"),
    (dict(max_new_tokens=0), Code.INVALID_ARGUMENT, "parameters.max_new_tokens"),
    (dict(temperature=-0.5), Code.INVALID_ARGUMENT, "parameters.temperature"),
    (dict(temperature=math.nan), Code.INVALID_ARGUMENT, "parameters.temperature"),
    (dict(top_p=1.5), Code.INVALID_ARGUMENT, "parameters.top_p must be in (0, 1], got 1.5"),
    (dict(top_p=0.0), Code.INVALID_ARGUMENT, "parameters.top_p"),
    (dict(repetition_penalty=0.0), Code.INVALID_ARGUMENT, "parameters.repetition_penalty"),
    (dict(repetition_penalty=-1.0), Code.INVALID_ARGUMENT, "parameters.repetition_penalty"),
    (dict(stop=["ok", ""]), Code.INVALID_ARGUMENT, "parameters.stop"),
    (dict(stop=["s"] * 17), Code.INVALID_ARGUMENT, "parameters.stop"),
    (dict(inputs="x" * 200), Code.INVALID_ARGUMENT, "max_input_tokens=64"),
    (dict(adapter_id="nope"), Code.NOT_FOUND, "'nope'"),
    (dict(adapter_id=""), Code.INVALID_ARGUMENT, "adapter_id"),
    (dict(adapter_id="../ad-a"), Code.INVALID_ARGUMENT, "'../ad-a'"),
    (dict(adapter_id="wrong-base"), Code.INVALID_ARGUMENT, "wrong base model"),
    (dict(merged_adapters={"ids": ["ad-a", "ad-a"]}), Code.INVALID_ARGUMENT, "listed twice"),
    (dict(merged_adapters={"ids": []}), Code.INVALID_ARGUMENT, "merged_adapters.ids"),
    (dict(merged_adapters={"ids": ["ad-a", "nope"]}), Code.NOT_FOUND, "'nope'"),
    (
        dict(merged_adapters={"ids": ["ad-a", "ad-b"], "weights": [1.0]}),
        Code.INVALID_ARGUMENT,
        "merged_adapters.weights",
    ),
    (
        dict(merged_adapters={"ids": ["ad-a", "ad-b"], "merge_strategy": "TIES", "density": 1.5}),
        Code.INVALID_ARGUMENT,
        "merged_adapters.density",
    ),
    (
        dict(merged_adapters={"ids": ["ad-a", "ad-b", "ad-c"], "merge_strategy": "SLERP"}),
        Code.INVALID_ARGUMENT,
        "exactly 2",
    ),
    (
        dict(merged_adapters={"ids": ["ad-a", "wrong-base"]}),
        Code.INVALID_ARGUMENT,
        "wrong base model",
    ),
]


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(("kwargs", "code", "text"), ERROR_CASES)
def test_errors_name_the_field_and_the_server_keeps_serving(client, kwargs, code, text, stream):
    kwargs = {"inputs": PROMPT, "max_new_tokens": 4, **kwargs}
    with pytest.raises(grpc.RpcError) as info:
        if stream:
            list(client.generate_stream(**kwargs))
        else:
            client.generate(**kwargs)
    assert info.value.code() == code
    assert text in info.value.details()
    assert client.generate(PROMPT, adapter_id="ad-a", max_new_tokens=2).generated_tokens == 2


def test_merge_rpc_without_a_spec_is_invalid(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.HotmergeStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Merge(pb.MergeRequest(), timeout=10)
    assert info.value.code() == Code.INVALID_ARGUMENT
    assert "merged_adapters" in info.value.details()


@pytest.mark.parametrize("name", ["", "too-wide"])
def test_merge_and_generate_refuse_the_same_svd_rank(server, client, name):
    """An svd_rank no adapter slot holds is refused by Merge (named or not) as by Generate,
    with one message, before anything is merged."""
    most = server.engine.runner.adapters.max_rank
    spec = {"ids": ["ad-a", "ad-b"], "merge_strategy": "TIES_SVD", "svd_rank": most + 1}
    merges = server.metrics.registry.get_sample_value
    before = merges("hotmerge_cache_misses_total", {"cache": "merge"})
    messages = set()
    for call in (
        lambda: client.merge(spec, name=name),
        lambda: client.generate(PROMPT, merged_adapters=spec, max_new_tokens=2),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == Code.INVALID_ARGUMENT
        messages.add(info.value.details())
    (message,) = messages
    assert f"merged_adapters.svd_rank is {most + 1}" in message and f"<= {most}" in message
    assert merges("hotmerge_cache_misses_total", {"cache": "merge"}) == before
    assert "too-wide" not in {a.id for a in client.list_adapters()}
    ok = client.merge({**spec, "svd_rank": most})  # the largest that fits: merged and served
    assert ok.rank == most
    assert client.generate(PROMPT, merged_adapters={**spec, "svd_rank": most}).generated_tokens


def test_unexpected_failure_is_internal_without_details(server, client, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(server.engine, "submit", boom)
    with pytest.raises(grpc.RpcError) as info:
        client.generate(PROMPT, max_new_tokens=2)
    assert info.value.code() == Code.INTERNAL
    assert "secret" not in info.value.details() and "Traceback" not in info.value.details()
    assert "request id" in info.value.details()
    monkeypatch.undo()
    assert client.generate(PROMPT, max_new_tokens=2).generated_tokens == 2


def test_engine_failure_mid_stream_is_internal_and_isolated(server, client, monkeypatch):
    runner = server.engine.runner
    forward, calls = runner.decode, []

    def fail_on_third_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("secret forward failure")
        return forward(*args, **kwargs)

    monkeypatch.setattr(runner, "decode", fail_on_third_forward)
    call = client.generate_stream(PROMPT, max_new_tokens=8)
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == Code.INTERNAL and "secret" not in info.value.details()
    monkeypatch.undo()
    assert client.generate(PROMPT, max_new_tokens=2).generated_tokens == 2


# -- deadlines and cancellation ---------------------------------------------------------------


@pytest.fixture
def slow_forward(server, monkeypatch):
    """Each forward takes 5 ms more, so a long request reliably outlives a short deadline."""
    runner = server.engine.runner
    forward = runner.decode

    def slow(*args, **kwargs):
        time.sleep(0.005)
        return forward(*args, **kwargs)

    monkeypatch.setattr(runner, "decode", slow)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_deadline_stops_the_work(server, client, slow_forward, stream):
    engine = server.engine
    failed = engine.stats.requests_failed
    steps = decode_steps(engine)
    with pytest.raises(grpc.RpcError) as info:
        kwargs = dict(max_new_tokens=180, timeout=0.3)
        if stream:
            list(client.generate_stream(PROMPT, **kwargs))
        else:
            client.generate(PROMPT, **kwargs)
    assert info.value.code() == Code.DEADLINE_EXCEEDED
    assert_engine_idle(engine, failed, max_steps_after=steps + 120)
    start = time.perf_counter()
    assert client.generate(PROMPT, max_new_tokens=2).generated_tokens == 2
    assert time.perf_counter() - start < 1.0


def test_client_cancel_of_a_stream_stops_the_work(server, client, slow_forward):
    engine = server.engine
    failed = engine.stats.requests_failed
    steps = decode_steps(engine)
    call = client.generate_stream(PROMPT, max_new_tokens=180)
    for _, _msg in zip(range(3), call, strict=False):
        pass
    call.cancel()
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() == Code.CANCELLED
    assert_engine_idle(engine, failed, max_steps_after=steps + 60)


# -- health, reflection, info, adapters -------------------------------------------------------


def test_health_reports_serving(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAME):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(server):
    with grpc.insecure_channel(server.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        assert "hotmerge.v1.Hotmerge" in db.get_services()
        assert "grpc.health.v1.Health" in db.get_services()
        assert db.FindFileContainingSymbol("hotmerge.v1.GenerateRequest").package == "hotmerge.v1"


def test_info(setup, client):
    server, model_dir, root = setup
    info = client.info()
    assert info.model_id == str(model_dir)
    assert (info.dtype, info.device, info.quantize) == ("float32", "cpu", "")
    assert (info.max_input_tokens, info.max_total_tokens) == (64, 256)
    assert (info.max_batch_size, info.default_max_new_tokens) == (4, 16)
    assert info.version == __version__
    assert str(root) in info.adapter_source
    assert {"linear", "ties", "dare_ties", "cat"} <= set(info.merge_strategies)
    assert info.max_merge_adapters == 16


def test_load_list_unload(client):
    client.unload_adapter("ad-b")
    listed = {a.id: a for a in client.list_adapters()}
    assert {"ad-a", "ad-b", "wrong-base"} <= set(listed)
    assert not listed["ad-b"].loaded

    reply = client.load_adapter("ad-b")
    a = reply.adapter
    assert (a.id, a.rank, a.alpha, a.loaded) == ("ad-b", 4, 16.0, True)
    assert sorted(a.target_modules) == ["o_proj", "up_proj"] and a.bytes > 0 and a.revision
    assert reply.load_ms > 0
    assert client.load_adapter("ad-b").load_ms == 0  # resident: nothing to load
    assert {a.id: a.loaded for a in client.list_adapters()}["ad-b"]

    assert client.unload_adapter("ad-b") is True
    assert client.unload_adapter("ad-b") is False
    assert not {a.id: a.loaded for a in client.list_adapters()}["ad-b"]
    # A request loads it again on demand, and says how long that took.
    reply = client.generate(PROMPT, adapter_id="ad-b", max_new_tokens=2)
    assert reply.timings.adapter_load_ms > 0


@pytest.mark.parametrize(
    ("adapter_id", "code", "text"),
    [
        ("nope", Code.NOT_FOUND, "'nope'"),
        ("wrong-base", Code.INVALID_ARGUMENT, "wrong base model"),
        ("", Code.INVALID_ARGUMENT, "adapter_id"),
        ("/etc", Code.INVALID_ARGUMENT, "'/etc'"),
    ],
)
def test_load_errors(client, adapter_id, code, text):
    with pytest.raises(grpc.RpcError) as info:
        client.load_adapter(adapter_id)
    assert info.value.code() == code and text in info.value.details()


def test_unavailable_until_the_model_is_loaded(tmp_path):
    running = open_port(ServerConfig(host="127.0.0.1", port=0, http_port=0, data_dir=tmp_path))
    try:
        with grpc.insecure_channel(running.target) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10
            )
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with (
            HotmergeClient(running.target, timeout=10) as client,
            pytest.raises(grpc.RpcError) as info,
        ):
            client.info()
        assert info.value.code() == Code.UNAVAILABLE and "loading" in info.value.details()
    finally:
        running.stop(0)


def test_port_in_use_is_a_clear_error(server):
    config = ServerConfig(host="127.0.0.1", port=server.port, http_port=0)
    with pytest.raises(OSError, match=f"127.0.0.1:{server.port}"):
        open_port(config)


# -- the request conversion, without a server -------------------------------------------------


def test_generation_request_defaults_and_implied_sampling():
    msg = pb.GenerateRequest(inputs="hi")
    req = generation_request(msg, default_max_new_tokens=7)
    p = req.params
    assert req.adapter_id is None and p.max_new_tokens == 7 and not p.do_sample
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.seed) == (1, 1, 0, 1, None)

    msg = pb.GenerateRequest(
        inputs="hi",
        adapter_id="a",
        parameters=pb.GenerationParameters(temperature=0.7, top_p=0.9, seed=0, stop=["x"]),
    )
    req = generation_request(msg, default_max_new_tokens=7)
    p = req.params
    assert req.adapter_id == "a" and p.do_sample and p.seed == 0 and p.stop == ("x",)
    assert (p.temperature, p.top_p) == (0.7, 0.9)  # the decimals sent, not their float32


def test_generation_request_translates_and_the_rule_book_checks():
    bad = generation_request(
        pb.GenerateRequest(inputs="hi", parameters=pb.GenerationParameters(top_p=2)),
        default_max_new_tokens=7,
    )
    limits = RequestLimits(max_input_tokens=8, max_total_tokens=16, kv_capacity_tokens=16,
                           vocab_size=256)  # fmt: skip
    with pytest.raises(InvalidArgument, match="parameters.top_p must be in"):
        request_rules.validate(bad, limits, lambda text: list(text.encode()))
    # A merge spec is resolved by the service, not here: the request carries no adapter id.
    request = generation_request(
        pb.GenerateRequest(inputs="hi", merged_adapters=pb.MergedAdapters(ids=["a"])),
        default_max_new_tokens=7,
    )
    assert request.adapter_id is None and request.params.max_new_tokens == 7


def test_client_request_building():
    request = generate_request("hi", adapter_id="a", max_new_tokens=3, top_p=None, stop=["x"])
    assert request.adapter_id == "a" and request.parameters.max_new_tokens == 3
    assert not request.parameters.HasField("top_p") and list(request.parameters.stop) == ["x"]
    assert request_metadata(request) == ()
    with pytest.raises(TypeError, match="max_tokens"):
        generate_request("hi", max_tokens=3)
    with pytest.raises(ValueError, match="not both"):
        generate_request("hi", adapter_id="a", merged_adapters={"ids": ["a"]})

    spec = {"ids": ["a", "b"], "weights": [1.0, 0.5], "merge_strategy": "TIES", "density": 0.5}
    request = generate_request("hi", merged_adapters=spec)
    assert request.merged_adapters.merge_strategy == pb.TIES
    # The balancer key goes with the request; a spec the server will reject goes without one.
    assert request_metadata(request) == (("x-merge-key", affinity_key(request.merged_adapters)),)
    bad = generate_request("hi", merged_adapters={"ids": ["a", "a"]})
    assert request_metadata(bad) == ()


def test_request_id_comes_back_in_trailing_metadata(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.HotmergeStub(channel)
        request = pb.GenerateRequest(inputs=PROMPT, parameters={"max_new_tokens": 1})
        _, call = stub.Generate.with_call(request, timeout=30)
        assert dict(call.trailing_metadata())["x-request-id"]
        # An id set by the caller (e.g. a load balancer) is kept, so logs line up.
        metadata = (("x-request-id", "lb-1234"),)
        _, call = stub.Generate.with_call(request, timeout=30, metadata=metadata)
        assert dict(call.trailing_metadata())["x-request-id"] == "lb-1234"
