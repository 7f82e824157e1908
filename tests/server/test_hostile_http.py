"""Issue 22, HTTP as careful as gRPC, and who may call: an API key on both fronts (health and
metrics open), bounded bodies, JSON only, the front's own error shapes, unknown fields and
coercion refused, clients that leave stop their work, X-Request-Timeout, in-flight accounting
on every exit, truthful timings. One in-process server on a tiny Llama, with a key."""

from __future__ import annotations

import json
import socket
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hotmerge.client import HotmergeClient
from hotmerge.config import ServerConfig
from hotmerge.server import start_server
from hotmerge.v1 import hotmerge_pb2 as pb
from hotmerge.v1 import hotmerge_pb2_grpc as pb_grpc

from tests.helpers import make_peft_adapter, tiny_llama, tiny_server_config

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 64 * 1024
SPEC = {"ids": ["ad-a", "ad-b"], "weights": [0.5, 0.5], "merge_strategy": "ties", "density": 0.5}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile-http")
    model_dir = tiny_llama(tmp)
    root = tmp / "adapters"
    make_peft_adapter(model_dir, root / "ad-a", r=4, seed=1)
    make_peft_adapter(model_dir, root / "ad-b", r=4, seed=2)
    config = tiny_server_config(
        tmp, model_dir, root, api_key=KEY, http_max_body_bytes=MAX_BODY, max_input_tokens=64,
        default_max_new_tokens=4, grace_s=5.0,
    )  # fmt: skip
    running = start_server(config)
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http_url, timeout=30, headers=AUTH) as client:
        yield client


def lorax_error(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error", "error_type"}, body
    return body["error"]


def openai_error(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error"} and "message" in body["error"], body
    return body["error"]["message"]


# -- exposure -----------------------------------------------------------------------------------


def test_loopback_by_default():
    assert ServerConfig().host == "127.0.0.1"


def test_api_key_on_both_fronts_health_and_metrics_open(server):
    url = server.http_url
    for path in ("/healthz", "/readyz", "/health", "/metrics"):
        assert httpx.get(url + path).status_code == 200, path
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(url + "/generate", json={"inputs": "hi"}, headers=headers)
        assert r.status_code == 401 and "API key" in lorax_error(r)
        r = httpx.get(url + "/v1/models", headers=headers)
        assert r.status_code == 401 and "API key" in openai_error(r)
    assert httpx.get(url + "/v1/models", headers=AUTH).status_code == 200
    with grpc.insecure_channel(server.target) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.HotmergeStub(channel).Info(pb.InfoRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            list(pb_grpc.HotmergeStub(channel).GenerateStream(pb.GenerateRequest(inputs="x")))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with HotmergeClient(server.target, timeout=30, api_key=KEY) as client:
        assert client.generate("hi", max_new_tokens=2).generated_tokens == 2


# -- bodies -------------------------------------------------------------------------------------


def test_bodies_are_bounded_and_json_only(http):
    big = {"inputs": "x" * (MAX_BODY + 1)}
    assert http.post("/generate", json=big).status_code == 413
    chunks = iter([b'{"inputs": "', b"x" * MAX_BODY, b'"}'])  # no Content-Length: chunked
    r = http.post("/generate", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "bytes" in lorax_error(r)
    r = http.post("/generate", content=b'{"inputs": "hi"}', headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in lorax_error(r)
    r = http.post("/v1/completions", content=b"{}", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in openai_error(r)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,  # deeply nested
        b'{"inputs": "\\ud800"}',  # a lone surrogate
        b'{"inputs": "hi", "parameters": {"stop": ["\\udfff"]}}',
        b"\xff\xfe not utf-8",
    ],
)
def test_nesting_surrogates_and_bad_bytes_are_4xx(http, body):
    for path in ("/generate", "/", "/v1/completions", "/merges"):
        r = http.post(path, content=body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text)


def test_client_leaving_mid_body_is_not_a_500(server):
    metrics_before = httpx.get(server.http_url + "/metrics").text.count('code="INTERNAL"')
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=5) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: 1000\r\n\r\n".encode()
            + b'{"inputs": "hel'
        )
    time.sleep(0.3)
    assert httpx.get(server.http_url + "/metrics").text.count('code="INTERNAL"') == metrics_before


# -- shapes, fields, types ----------------------------------------------------------------------


def test_404_405_have_the_fronts_shape(http):
    assert http.get("/nope").status_code == 404 and "/nope" in lorax_error(http.get("/nope"))
    r = http.get("/v1/nope")
    assert r.status_code == 404 and "/v1/nope" in openai_error(r)
    r = http.get("/generate")
    assert r.status_code == 405 and "GET" in lorax_error(r)
    r = http.delete("/v1/completions")
    assert r.status_code == 405 and "DELETE" in openai_error(r)


@pytest.mark.parametrize(
    "parameters",
    [
        {"max_tokens": 4},  # an OpenAI name on LoRAX's route: refused, not ignored
        {"max_new_tokens": "4"},
        {"max_new_tokens": 4.0},
        {"do_sample": "true"},
        {"seed": -1},
        {"top_k": -3},
    ],
)
def test_lorax_unknown_fields_and_wrong_types_are_422(http, parameters):
    r = http.post("/generate", json={"inputs": "hi", "parameters": parameters})
    assert r.status_code == 422, r.text
    assert next(iter(parameters)) in lorax_error(r)


def test_lorax_client_fields_all_accepted(http):
    import lorax.types

    params = lorax.types.Parameters(max_new_tokens=2).model_dump(by_alias=True)
    r = http.post("/generate", json={"inputs": "hi", "parameters": params, "stream": False})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "body, named",
    [
        ({"prompt": "hi", "max_tokens": 10_000}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": "4"}, "max_tokens"),
        ({"prompt": "", "max_tokens": 2}, "prompt"),
        ({"prompt": [99999], "max_tokens": 2}, "prompt"),
        ({"prompt": "hi", "frobnicate": 1}, "frobnicate"),
        ({"prompt": "hi", "logit_bias": {"1": 5}}, "logit_bias"),
    ],
)
def test_openai_errors_name_openai_fields(http, body, named):
    r = http.post("/v1/completions", json={"model": "tiny-llama", **body})
    assert r.status_code == 400, r.text
    message = openai_error(r)
    assert named in message
    assert not any(word in message for word in ("max_new_tokens", "parameters.", "inputs"))


def test_openai_unknown_model_names_model(http):
    r = http.post("/v1/completions", json={"model": "no-such", "prompt": "hi"})
    assert r.status_code in (400, 404) and "model" in openai_error(r)
    assert "adapter_id" not in openai_error(r)


# -- work stops when the client goes; deadlines; accounting --------------------------------------


@pytest.fixture
def slow_decode(server, monkeypatch):
    runner = server.engine.runner
    real = runner.decode

    def slow(*args):
        time.sleep(0.05)
        return real(*args)

    monkeypatch.setattr(runner, "decode", slow)


def test_non_streaming_request_is_cancelled_when_its_client_leaves(server, slow_decode):
    engine = server.engine
    body = json.dumps({"inputs": "hi", "parameters": {"max_new_tokens": 200}}).encode()
    head = (
        "POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=5) as sock:
        sock.sendall(head.encode() + body)
        deadline = time.monotonic() + 5
        while engine.running_requests == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.running_requests == 1
    started = time.monotonic()  # 200 tokens at 50 ms would take 10 s
    while engine.running_requests and time.monotonic() - started < 3:
        time.sleep(0.02)
    assert engine.running_requests == 0
    assert server.lifecycle.in_flight == 0


def test_request_timeout_header(http, slow_decode):
    r = http.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 200}},
                  headers={"X-Request-Timeout": "0.3"})  # fmt: skip
    assert r.status_code == 504 and "deadline" in lorax_error(r)
    r = http.post("/merges", json={"merged_adapters": SPEC}, headers={"X-Request-Timeout": "0"})
    assert r.status_code == 422 and "x-request-timeout" in lorax_error(r).lower()
    r = http.post("/merges", json={"merged_adapters": SPEC}, headers={"X-Request-Timeout": "30"})
    assert r.status_code == 200


def test_failed_requests_leave_nothing_in_flight(server, http):
    for _ in range(5):
        assert http.post("/generate", json={"inputs": ""}).status_code == 422
        assert http.post("/v1/completions", json={"model": "x", "prompt": "hi"}).status_code
    assert server.lifecycle.in_flight == 0


# -- timings ------------------------------------------------------------------------------------


def test_timings_count_from_arrival_and_add_up(http):
    fresh = {**SPEC, "weights": [0.3, 0.9]}  # not merged before: a cache miss
    parameters = {"merged_adapters": fresh, "max_new_tokens": 3}
    r = http.post("/generate", json={"inputs": "hi", "parameters": parameters})
    assert r.status_code == 200, r.text
    t = r.json()["hotmerge"]["timings"]
    assert t["merge_ms"] > 0 and t["total_ms"] >= t["merge_ms"] + t["adapter_load_ms"]
    parts = sum(
        t[k] for k in ("queue_ms", "adapter_load_ms", "merge_ms", "prefill_ms", "decode_ms")
    )
    assert parts == pytest.approx(t["total_ms"], abs=1.0)


def test_request_ids_and_stop_sequences_are_bounded(http):
    for given in ("a" * 65, "<script>", "ok id"):
        r = http.post("/generate", json={"inputs": "hi"}, headers={"X-Request-Id": given})
        assert r.status_code == 200 and r.headers["x-request-id"] != given
    r = http.post("/generate", json={"inputs": "hi"}, headers={"X-Request-Id": "lb-123.4"})
    assert r.headers["x-request-id"] == "lb-123.4"
    r = http.post("/generate", json={"inputs": "hi", "parameters": {"stop": ["x" * 513]}})
    assert r.status_code == 422 and "stop" in lorax_error(r)
