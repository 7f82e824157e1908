"""Idle connections are closed on both ports, and the HTTP port bounds its connections."""

from __future__ import annotations

import socket
import time

import grpc
import pytest
from hotmerge.server import start_server
from hotmerge.v1 import hotmerge_pb2 as pb
from hotmerge.v1 import hotmerge_pb2_grpc as pb_grpc

from tests.helpers import tiny_llama, tiny_server_config

IDLE_S = 0.5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("idle")
    config = tiny_server_config(
        tmp,
        tiny_llama(tmp),
        tmp / "adapters",
        http_keep_alive_s=IDLE_S,
        http_max_connections=2,
        max_connection_idle_s=IDLE_S,
    )
    running = start_server(config)
    yield running
    running.stop(0)


def http_get(sock: socket.socket, path: str = "/healthz") -> bytes:
    """One whole response (status line, headers, body) on a kept-alive connection."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(4096)
    return data


def connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.http_port), timeout=5)


def test_http_keep_alive_connection_closed_when_idle(server):
    with connect(server) as sock:
        assert http_get(sock).startswith(b"HTTP/1.1 200")
        assert http_get(sock).startswith(b"HTTP/1.1 200")  # kept alive between requests
        time.sleep(IDLE_S * 3)
        assert sock.recv(4096) == b""  # the server closed it


def test_http_connections_are_bounded_but_health_and_metrics_answer(server):
    with connect(server) as first, connect(server):
        assert http_get(first, "/info").startswith(b"HTTP/1.1 200")
        with connect(server) as third:
            assert http_get(third, "/info").startswith(b"HTTP/1.1 503")  # over the bound
        with connect(server) as probe:  # probes and scrapes still get through
            assert http_get(probe, "/healthz").startswith(b"HTTP/1.1 200")
        with connect(server) as scrape:
            assert http_get(scrape, "/metrics").startswith(b"HTTP/1.1 200")
    time.sleep(0.2)
    with connect(server) as fourth:
        assert http_get(fourth, "/info").startswith(b"HTTP/1.1 200")  # room once they closed


def test_http_connection_that_sends_nothing_is_closed(server):
    with connect(server) as sock:
        time.sleep(IDLE_S * 3)
        assert sock.recv(4096) == b""  # closed without a request ever coming


def test_grpc_connection_closed_when_idle(server):
    states = []
    with grpc.insecure_channel(server.target) as channel:
        channel.subscribe(states.append)
        pb_grpc.HotmergeStub(channel).Info(pb.InfoRequest(), timeout=10)
        called = time.monotonic()

        def idle_after_ready() -> bool:  # callbacks arrive on gRPC's thread, a little later
            ready = grpc.ChannelConnectivity.READY
            return (
                ready in states and grpc.ChannelConnectivity.IDLE in states[states.index(ready) :]
            )

        while not idle_after_ready() and time.monotonic() < called + IDLE_S * 10:
            time.sleep(0.05)
        # The server's GOAWAY on the idle connection sent the channel back to IDLE.
        assert idle_after_ready()
        assert time.monotonic() - called >= IDLE_S * 0.8  # not before it was idle that long
        pb_grpc.HotmergeStub(channel).Info(pb.InfoRequest(), timeout=10)  # reconnects


def test_config_carries_the_idle_timeout():
    from hotmerge.config import ServerConfig

    options = dict(ServerConfig(max_connection_idle_s=2.5).grpc_options())
    assert options["grpc.max_connection_idle_ms"] == 2500
    assert "grpc.max_connection_idle_ms" not in dict(
        ServerConfig(max_connection_idle_s=None).grpc_options()
    )
