"""The replica's HTTP side port, for balancers and scrapers that speak HTTP rather than gRPC.

    GET /healthz  liveness: 200 while the process answers at all
    GET /readyz   readiness: 200 only when the replica is SERVING, else 503 (loading, draining)
    GET /metrics  Prometheus text format of the replica's registry

Served by a ``ThreadingHTTPServer`` in a daemon thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class HttpEndpoint:
    def __init__(
        self,
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        state: Callable[[], str],
        host: str = "0.0.0.0",
        port: int = 0,
    ) -> None:
        handler = type(
            "Handler",
            (_Handler,),
            {"registry": registry, "ready": staticmethod(ready), "state": staticmethod(state)},
        )
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="hotmerge-http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    registry: CollectorRegistry
    ready: Callable[[], bool]
    state: Callable[[], str]

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._reply(200, b"ok\n")
        elif path == "/readyz":
            ok = self.ready()
            self._reply(200 if ok else 503, f"{self.state()}\n".encode())
        elif path == "/metrics":
            self._reply(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        else:
            self._reply(404, b"not found: try /healthz, /readyz or /metrics\n")

    def _reply(self, code: int, body: bytes, content_type: str = "text/plain") -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # a checker that hung up early
            pass

    def log_message(self, format, *args) -> None:  # probes every second: keep the log quiet
        pass
