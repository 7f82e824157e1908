"""Issue 22: the API fuzzed. HTTP bodies drawn from the server's own OpenAPI document (its
JSON schemas turned into hypothesis strategies by ``from_schema``: the subset pydantic writes;
hypothesis-jsonschema 0.23 does not run on hypothesis 6.170) and outside it (any JSON, NaN and
Infinity too); gRPC messages drawn field by field (hypothesis), and raw bytes. Whatever comes:
no 500 / INTERNAL, and the server still serves.

Bounded for CI (~30 s on 2 cores): ``HTTP_EXAMPLES`` per route and ``GRPC_EXAMPLES`` per test
(env HOTMERGE_FUZZ_EXAMPLES scales both), derandomized so that a failure reproduces, on a tiny
Llama with at most a few tokens per request."""

from __future__ import annotations

import json
import os

import grpc
import httpx
import pytest
from hotmerge.client import HotmergeClient
from hotmerge.server import start_server
from hotmerge.v1 import hotmerge_pb2 as pb
from hotmerge.v1 import hotmerge_pb2_grpc as pb_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import make_peft_adapter, tiny_llama, tiny_server_config

SCALE = float(os.environ.get("HOTMERGE_FUZZ_EXAMPLES", "1"))
HTTP_EXAMPLES, GRPC_EXAMPLES = int(50 * SCALE), int(200 * SCALE)


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,  # the same examples every run: a CI failure reproduces
        suppress_health_check=list(HealthCheck),
    )


SERVER_ERRORS = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    model_dir = tiny_llama(tmp)
    root = tmp / "adapters"
    make_peft_adapter(model_dir, root / "ad-a", r=4, seed=1)
    make_peft_adapter(model_dir, root / "ad-b", r=4, seed=2)
    config = tiny_server_config(
        tmp, model_dir, root, max_input_tokens=16, max_total_tokens=24, default_max_new_tokens=2,
        max_wait_s=2.0, http_max_body_bytes=64 * 1024, max_named_merges=64,
    )  # fmt: skip
    running = start_server(config)
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http_url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.HotmergeStub(channel)


def assert_serving(server) -> None:
    assert httpx.get(server.http_url + "/healthz").status_code == 200
    with HotmergeClient(server.target, timeout=30) as client:
        assert client.generate("hi", adapter_id="ad-a", max_new_tokens=1).generated_tokens == 1


# -- HTTP, from the OpenAPI document ------------------------------------------------------------


_INTS = st.integers(-3, 8) | st.sampled_from([2**31 - 1, 2**32, 2**63, 2**64 - 1, 2**64, -(2**63)])


_SMALL = st.integers(0, 3)
_HTTP_SPEC = st.fixed_dictionaries(
    {"ids": st.lists(st.sampled_from(["ad-a", "ad-b", "nope"]), min_size=1, max_size=2)},
    optional={
        "weights": st.lists(st.floats(-3, 3) | st.floats(), max_size=3),
        "merge_strategy": st.sampled_from(["linear", "TIES", "dare_ties", "cat", "svd", "x", 3]),
        "density": st.floats(0, 1.5),
        "svd_rank": _SMALL | _INTS,
        "seed": _INTS,
    },
)
# Properties whose schema (any string, any int) makes valid requests rare: valid values mixed in.
_HINTS = {
    "model": st.sampled_from(["tiny-llama", "ad-a", "ad-b", "nope"]),
    "adapter_id": st.sampled_from(["ad-a", "ad-b", "nope", "../x"]),
    "max_new_tokens": _SMALL,
    "max_tokens": _SMALL,
    "seed": st.sampled_from([2**63, 2**64 - 1]),
    "top_k": st.sampled_from([0, 5, 2**63]),
    "do_sample": st.just(True),
    "temperature": st.sampled_from([0.5, 1.0]),
    "merged_adapters": _HTTP_SPEC,
    "name": st.sampled_from(["fuzz-a", "fuzz/b", "ad-a", "../x", ""]),
    "prompt": st.sampled_from(["hello", [1, 2, 3]]),
    "inputs": st.just("hello"),
    "n": st.just(1),
}


def from_schema(schema: dict, root: dict | None = None) -> st.SearchStrategy:
    """Values of a JSON schema as pydantic writes them ($ref/$defs, anyOf, enum, object with
    properties/required/additionalProperties, array/items, scalars), edge values favoured."""
    root = root or schema
    if "$ref" in schema:
        return st.deferred(lambda: from_schema(root["$defs"][schema["$ref"].split("/")[-1]], root))
    if "anyOf" in schema:
        return st.one_of([from_schema(s, root) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        if not props:
            return st.dictionaries(st.text(max_size=8), _json, max_size=4)
        required = set(schema.get("required", []))
        fields = {k: _HINTS.get(k, st.nothing()) | from_schema(v, root) for k, v in props.items()}
        return st.fixed_dictionaries(
            {k: v for k, v in fields.items() if k in required},
            optional={k: v for k, v in fields.items() if k not in required},
        )
    scalars = {
        "array": lambda: st.lists(from_schema(schema.get("items", {}), root), max_size=4),
        "string": lambda: st.text(max_size=24),
        "integer": lambda: _INTS,
        "number": lambda: st.floats() | _INTS,
        "boolean": st.booleans,
        "null": st.none,
    }
    return scalars[kind]() if kind in scalars else _json


def body_routes(server) -> list[tuple[str, dict]]:
    document = httpx.get(server.http_url + "/openapi.json").json()
    routes = []
    for route, methods in document["paths"].items():
        body = methods.get("post", {}).get("requestBody")
        if body:
            routes.append((route, body["content"]["application/json"]["schema"]))
    return routes


def test_openapi_documents_every_body(server):
    assert {r for r, _ in body_routes(server)} == {
        "/", "/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions", "/merges"
    }  # fmt: skip


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),  # fmt: skip
    max_leaves=12,
)


@pytest.mark.parametrize(
    "route",
    [
        "/",
        "/generate",
        "/generate_stream",
        "/v1/completions",
        "/v1/chat/completions",
        "/merges",
    ],  # fmt: skip
)
def test_http_bodies_never_give_500(server, http, route):
    schema = dict(body_routes(server))[route]
    seen = {"examples": 0, "2xx": 0}

    @fuzz(HTTP_EXAMPLES)
    @given(body=from_schema(schema) | _json)
    def one(body):
        data = json.dumps(body, allow_nan=True)  # NaN / Infinity: Python's json reads them
        r = http.post(route, content=data, headers={"content-type": "application/json"})
        seen["examples"] += 1
        seen["2xx"] += r.status_code < 300
        assert r.status_code < 500, (route, body, r.status_code, r.text)
        if r.status_code >= 400:
            assert "error" in r.json()

    one()
    print(f"fuzz {route}: {seen}")
    assert seen["examples"] >= HTTP_EXAMPLES // 2
    assert_serving(server)


# -- gRPC, field by field -----------------------------------------------------------------------

_floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
_ids = st.sampled_from(["ad-a", "ad-b", "ad-a", "ad-b", "", "../x", "a" * 300, "nope",
                        "ad-a/../ad-b"]) | st.text(max_size=12)  # fmt: skip
_spec = st.fixed_dictionaries(
    {"ids": st.lists(_ids, max_size=3)},
    optional={
        "weights": st.lists(st.floats(-2, 2) | _floats, max_size=3),
        "merge_strategy": st.integers(0, 12) | st.integers(0, 2**31 - 1),
        "majority_sign_method": st.integers(0, 4),
        "density": st.floats(0, 1) | _floats,
        "seed": st.integers(0, 2**64 - 1),
        "svd_rank": st.integers(0, 8) | st.integers(0, 2**32 - 1),
        "svd_clamp": st.floats(0, 1) | _floats,
    },
)
# Edge values and valid ones mixed, so that requests also get past validation and run.
_params = st.fixed_dictionaries(
    {},
    optional={
        "max_new_tokens": st.integers(0, 3) | st.integers(0, 2**32 - 1),
        "temperature": st.sampled_from([0.0, 0.7, 1.0]) | _floats,
        "top_p": st.sampled_from([0.5, 1.0]) | _floats,
        "top_k": st.integers(0, 50) | st.integers(0, 2**32 - 1),
        "do_sample": st.booleans(),
        "seed": st.sampled_from([0, 2**63 - 1, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1),
        "repetition_penalty": st.sampled_from([1.0, 1.3]) | _floats,
        "stop": st.lists(st.text(max_size=4), max_size=3),
    },
) | st.fixed_dictionaries(  # valid sampling with edge values: these run
    {
        "do_sample": st.just(True),
        "max_new_tokens": st.integers(1, 3),
        "seed": st.sampled_from([2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1),
    },
    optional={"top_k": st.integers(0, 2**32 - 1), "temperature": st.floats(0.01, 5)},
)


def _spec_message(fields: dict) -> pb.MergedAdapters:
    return pb.MergedAdapters(**fields)  # NaN and inf are valid floats on the wire


def _call(fn, request):
    try:
        fn(request, timeout=20)
    except grpc.RpcError as err:
        assert err.code() not in SERVER_ERRORS, (request, err.code(), err.details())
        return err.code()
    return grpc.StatusCode.OK


def _text():
    # protobuf strings are UTF-8: no surrogates
    return st.text(st.characters(exclude_categories=("Cs",)), max_size=24)


def test_grpc_messages_never_give_internal(server, grpc_stub):
    codes: dict = {}

    @fuzz(GRPC_EXAMPLES)
    @given(
        inputs=st.sampled_from(["hello", "Once upon"]) | _text(),
        input_ids=st.lists(st.integers(0, 2**32 - 1), max_size=6),
        params=_params,
        adapter=st.none() | _ids,
        spec=st.none() | _spec,
        name=st.none() | _text(),
    )
    def one(inputs, input_ids, params, adapter, spec, name):
        request = pb.GenerateRequest(parameters=pb.GenerationParameters(**params))
        if input_ids and not inputs:
            request.input_ids.extend(input_ids)
        else:
            request.inputs = inputs
        if adapter is not None:
            request.adapter_id = adapter
        if spec is not None:
            request.merged_adapters.CopyFrom(_spec_message(spec))
        for method in (grpc_stub.Generate, lambda r, timeout: list(grpc_stub.GenerateStream(
                r, timeout=timeout))):  # fmt: skip
            code = _call(method, request)
            codes[code] = codes.get(code, 0) + 1
        if spec is not None:
            merge = pb.MergeRequest(merged_adapters=_spec_message(spec), name=name or "")
            code = _call(grpc_stub.Merge, merge)
            codes[code] = codes.get(code, 0) + 1
        if adapter is not None:
            _call(grpc_stub.LoadAdapter, pb.LoadAdapterRequest(adapter_id=adapter))

    one()
    print(f"fuzz gRPC messages: { {c.name: n for c, n in codes.items()} }")
    assert sum(codes.values()) >= GRPC_EXAMPLES
    assert_serving(server)


def test_grpc_raw_bytes_never_give_internal(server):
    methods = ["Generate", "Merge", "LoadAdapter", "UnloadAdapter", "Info", "ListAdapters"]
    with grpc.insecure_channel(server.target) as channel:
        calls = {
            m: channel.unary_unary(
                f"/hotmerge.v1.Hotmerge/{m}", request_serializer=None, response_deserializer=None
            )  # fmt: skip
            for m in methods
        }

        @fuzz(GRPC_EXAMPLES)
        @given(method=st.sampled_from(methods), data=st.binary(max_size=64))
        def one(method, data):
            _call(calls[method], data)

        one()
    assert_serving(server)
