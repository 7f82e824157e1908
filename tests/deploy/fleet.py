"""A local fleet for the deploy tests: ``hotmerge serve`` replicas as subprocesses and HAProxy in
front of them (``deploy/haproxy.cfg``), all on loopback. Every wait is bounded."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
Status = health_pb2.HealthCheckResponse


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def health_status(target: str, timeout: float = 1.0) -> str:
    """The gRPC health status name of the whole server, or the error code's name."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError as err:
            return err.code().name
    return Status.ServingStatus.Name(reply.status)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return 0, ""


@dataclass
class Replica:
    name: str
    port: int
    http_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen | None = None
    health_seen: list[str] = field(default_factory=list)  # distinct statuses, in order

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, *extra: str) -> None:
        args = [sys.executable, "-m", "hotmerge.cli", "serve", "--host", "127.0.0.1"]
        args += ["--port", str(self.port), "--http-port", str(self.http_port)]
        args += ["--data-dir", str(self.data_dir), "--log-level", "INFO", *extra]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def watch_health(self, timeout: float) -> None:
        """Poll gRPC health until SERVING, recording each distinct status seen."""

        def serving() -> bool:
            assert self.proc.poll() is None, f"{self.name} exited:\n{self.log()}"
            status = health_status(self.target, timeout=2.0)
            # Only answers count: UNAVAILABLE (port not open yet) or a deadline (a busy CPU
            # while the model loads) say nothing about the replica's state.
            answered = status in ("SERVING", "NOT_SERVING", "SERVICE_UNKNOWN", "UNKNOWN")
            if answered and (not self.health_seen or self.health_seen[-1] != status):
                self.health_seen.append(status)
            return status == "SERVING"

        wait_until(serving, timeout, f"{self.name} to serve", interval=0.02)

    def metric(self, name: str, labels: str = "") -> float:
        code, text = http_get(f"http://127.0.0.1:{self.http_port}/metrics")
        assert code == 200, f"{self.name} /metrics: {code}"
        pattern = re.compile(rf"^{re.escape(name + labels)} (\S+)$", re.M)
        match = pattern.search(text)
        return float(match.group(1)) if match else 0.0

    def merge_misses(self) -> int:
        return int(self.metric("hotmerge_cache_misses_total", '{cache="merge"}'))

    def generate_ok(self) -> int:
        return int(self.metric("hotmerge_requests_total", '{code="OK",method="Generate"}'))

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@dataclass
class Balancer:
    port: int
    cfg_path: Path
    stats_socket: Path
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, replicas: list[Replica]) -> None:
        lines = [
            f"    server {r.name} {r.target} proto h2 check check-proto h1 port {r.http_port}\n"
            for r in replicas
        ]
        self.cfg_path.write_text(HAPROXY_CFG.read_text() + "".join(lines))
        env = {
            **os.environ,
            "HOTMERGE_LB_ADDR": self.target,
            "HOTMERGE_LB_STATS": str(self.stats_socket),
        }
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                ["haproxy", "-db", "-f", str(self.cfg_path)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def server_states(self) -> dict[str, str]:
        """HAProxy's view of each replica: UP, DOWN, ... (from `show stat` on the admin socket)."""
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(str(self.stats_socket))
                s.sendall(b"show stat\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except OSError:
            return {}
        lines = data.decode().splitlines()
        if not lines or not lines[0].startswith("# "):
            return {}
        header = lines[0][2:].split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {
            r["svname"]: r["status"]
            for r in rows
            if r.get("pxname") == "replicas" and r["svname"] not in ("BACKEND", "FRONTEND")
        }

    def wait_up(self, names: list[str], timeout: float) -> None:
        def all_up() -> bool:
            assert self.proc.poll() is None, f"haproxy exited:\n{self.log_path.read_text()}"
            states = self.server_states()
            return all(states.get(n) == "UP" for n in names)

        wait_until(all_up, timeout, f"haproxy to see {names} UP")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def replica_dirs(tmp: Path, template: Path, n: int) -> list[Path]:
    """n small data dirs, copies of one built embedded default (built once, copied n times)."""
    dirs = []
    for i in range(n):
        d = tmp / f"r{i + 1}"
        shutil.copytree(template, d)
        dirs.append(d)
    return dirs
