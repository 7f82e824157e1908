"""The ``hotmerge`` CLI against a server on the embedded default (built under a temp dir), and
``hotmerge serve`` as a real process that drains on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hotmerge.cli import main, printable
from hotmerge.client import HotmergeClient
from hotmerge.config import ServerConfig
from hotmerge.server import start_server

from tests.helpers import free_port


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("embedded")


@pytest.fixture(scope="module")
def target(data_dir):
    config = ServerConfig(
        data_dir=data_dir, host="127.0.0.1", port=0, http_port=0, default_max_new_tokens=8
    )
    server = start_server(config)
    yield server.target
    server.stop(0)


def test_generate_prints_text_then_timings(target, capsys):
    assert main(["generate", "--target", target, "--adapter", "demo-a", "hello"]) == 0
    out, err = capsys.readouterr()
    with HotmergeClient(target) as client:
        reply = client.generate("hello", adapter_id="demo-a")
    assert out == printable(reply.generated_text) + "\n" and out.strip()
    assert "[8 tokens, finish length]" in err
    for stage in ("queue", "adapter load", "merge", "prefill", "decode", "total"):
        assert f"{stage} " in err and " ms" in err


def test_generate_stream_prints_the_same_text(target, capsys):
    args = ["generate", "--target", target, "--adapter", "demo-a", "hello"]
    assert main(args) == 0
    plain = capsys.readouterr()
    assert main([*args, "--stream"]) == 0
    streamed = capsys.readouterr()
    assert streamed.out == plain.out
    assert "[8 tokens, finish length]" in streamed.err


def test_generate_details_and_options(target, capsys):
    args = ["generate", "--target", target, "--max-new-tokens", "3", "--details", "--seed", "1"]
    assert main([*args, "--temperature", "0.7", "--top-k", "20", "hi"]) == 0
    out, err = capsys.readouterr()
    assert len([line for line in err.splitlines() if line.startswith("  ")]) == 3
    assert "[3 tokens" in err


def test_generate_error_exits_nonzero(target, capsys):
    assert main(["generate", "--target", target, "--adapter", "nope", "hello"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "error: NOT_FOUND: adapter 'nope' not found" in err
    assert main(["generate", "--target", target, "--top-p", "1.5", "hello"]) == 1
    assert "parameters.top_p must be in (0, 1], got 1.5" in capsys.readouterr().err


def test_unreachable_server(capsys):
    args = ["info", "--target", f"127.0.0.1:{free_port()}", "--timeout", "5"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err and "hotmerge serve" in err


def test_info_adapters_load_unload(target, data_dir, capsys):
    assert main(["info", "--target", target]) == 0
    out = capsys.readouterr().out
    assert "dtype: float32" in out and "max_total_tokens: 2048" in out
    assert f"adapter_source: {data_dir / 'adapters'}" in out

    assert main(["load", "--target", target, "demo-c"]) == 0
    assert capsys.readouterr().out.startswith("loaded demo-c: rank 8")
    assert main(["adapters", "--target", target]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["id", "rank", "alpha"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"demo-a", "demo-b", "demo-c", "demo-d"}
    assert rows["demo-c"][4] == "yes"  # loaded
    assert main(["unload", "--target", target, "demo-c"]) == 0
    assert capsys.readouterr().out == "unloaded demo-c\n"
    assert main(["unload", "--target", target, "demo-c"]) == 0
    assert capsys.readouterr().out == "demo-c was not loaded\n"


def test_printable_escapes_control_characters():
    assert printable("a\nb\tc") == "a\nb\tc"
    assert printable("x\x1b[2Jy\r\x00é") == "x\\x1b[2Jy\\x0d\\x00é"


def test_serve_process_serves_then_drains_on_sigterm(data_dir, target):
    # `target` first: the embedded default is already built under data_dir.
    port = free_port()
    env = {**os.environ, "HOTMERGE_DATA_DIR": str(data_dir)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hotmerge.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--http-port",
            "0",
            "--default-max-new-tokens",
            "4",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 90
            while True:
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        with HotmergeClient(f"127.0.0.1:{port}", timeout=30) as client:
            assert client.generate("hello", adapter_id="demo-b").generated_tokens == 4
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log
    assert "serving" in log and "adapter=demo-b tokens=4" in log and "stopped" in log
