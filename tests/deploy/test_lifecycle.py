"""A replica's drain in process (health, /readyz, refusals, grace) and the client's retries and
round-robin over several targets, against small in-process gRPC servers."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from hotmerge.client import HotmergeClient, channel_options, channel_target
from hotmerge.config import ServerConfig
from hotmerge.lifecycle import REFUSED
from hotmerge.server import start_server
from hotmerge.v1 import hotmerge_pb2 as pb
from hotmerge.v1 import hotmerge_pb2_grpc as pb_grpc

from tests.deploy.fleet import health_status, http_get, wait_until

LONG_TOKENS = 40


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("embedded")


def start(data_dir, **overrides):
    config = ServerConfig(data_dir=data_dir, host="127.0.0.1", port=0, http_port=0, **overrides)
    return start_server(config)


def test_drain_finishes_in_flight_refuses_new_and_reports_not_serving(data_dir):
    running = start(data_dir)
    readyz = f"http://127.0.0.1:{running.http_port}/readyz"
    try:
        assert health_status(running.target) == "SERVING"
        assert http_get(readyz) == (200, "serving\n")
        with HotmergeClient(running.target, timeout=30, retry=False) as client:
            stream = client.generate_stream("hi", adapter_id="demo-a", max_new_tokens=LONG_TOKENS)
            next(stream)  # in flight
            stopper = threading.Thread(target=running.stop, args=(20,))
            stopper.start()
            wait_until(lambda: running.lifecycle.state.value == "draining", 5, "draining")
            assert health_status(running.target) == "NOT_SERVING"
            assert http_get(readyz) == (503, "draining\n")
            with pytest.raises(grpc.RpcError) as refused:
                client.generate("hi", adapter_id="demo-a", max_new_tokens=1)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert refused.value.details() == REFUSED
            *_, last = stream  # the in-flight request finishes
            assert last.done and last.generated_tokens == LONG_TOKENS
            stopper.join(timeout=30)
        assert running.lifecycle.state.value == "stopped"
    finally:
        running.stop(0)


def test_grace_period_over_cancels_the_rest(data_dir):
    running = start(data_dir)
    with HotmergeClient(running.target, timeout=30, retry=False) as client:
        stream = client.generate_stream("hi", adapter_id="demo-a", max_new_tokens=1000)
        next(stream)
        started = time.monotonic()
        assert running.stop(0.3) is False  # not drained: the request was cancelled
        assert time.monotonic() - started < 10
        with pytest.raises(grpc.RpcError) as cancelled:
            list(stream)
        assert cancelled.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


# -- the client: retries and several targets -----------------------------------------------------


class FlakyInfo(pb_grpc.HotmergeServicer):
    """Info fails with UNAVAILABLE ``failures`` times, then answers with ``name``."""

    def __init__(self, name: str, failures: int = 0) -> None:
        self.name, self.failures, self.calls = name, failures, 0

    def Info(self, request, context):
        self.calls += 1
        if self.calls <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "not yet")
        return pb.InfoResponse(model_id=self.name)


@pytest.fixture
def serve_fake():
    servers = []

    def serve(servicer) -> str:
        server = grpc.server(ThreadPoolExecutor(4))
        pb_grpc.add_HotmergeServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield serve
    for server in servers:
        server.stop(0)


def test_client_retries_unavailable_within_its_budget(serve_fake):
    flaky = FlakyInfo("a", failures=2)
    target = serve_fake(flaky)
    with HotmergeClient(target, timeout=10) as client:
        assert client.info().model_id == "a"
    assert flaky.calls == 3

    never = FlakyInfo("b", failures=100)
    target = serve_fake(never)
    with HotmergeClient(target, timeout=10) as client, pytest.raises(grpc.RpcError) as err:
        client.info()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert never.calls == 5  # maxAttempts

    once = FlakyInfo("c", failures=1)
    client = HotmergeClient(serve_fake(once), timeout=10, retry=False)
    with client, pytest.raises(grpc.RpcError):
        client.info()
    assert once.calls == 1


def test_client_spreads_over_several_targets_round_robin(serve_fake):
    fakes = [FlakyInfo("a"), FlakyInfo("b")]
    targets = ",".join(serve_fake(f) for f in fakes)
    assert channel_target(targets) == f"ipv4:{targets}"
    assert channel_target("localhost:50051") == "localhost:50051"
    assert "round_robin" in dict(channel_options(targets))["grpc.service_config"]
    with HotmergeClient(targets, timeout=10) as client:
        names = [client.info().model_id for _ in range(10)]
    assert sorted(set(names)) == ["a", "b"]
