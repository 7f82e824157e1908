"""The HTTP server: LoRAX REST, OpenAI-compatible routes, named merges, health and metrics.

    POST /generate, /generate_stream (SSE), /  (LoRAX; ``/`` dispatches on ``stream``)
    GET  /health, /info                          (LoRAX)                  routes_lorax.py
    POST /v1/completions, /v1/chat/completions   (OpenAI; ``stream`` for SSE)
    GET  /v1/models                              (OpenAI: base model, adapters, named merges)
                                                                          routes_openai.py
    POST /merges, GET /merges                    (register and list named merges)
    GET  /metrics, /healthz, /readyz             (Prometheus; liveness; readiness)
                                                                          routes_admin.py

Every route translates its wire format (``lorax.py``, ``openai.py``) and calls the request
path (``core.py``) that the gRPC service calls too, through ``http_common.HttpContext``
(errors as the front's JSON, blocking calls in worker threads, streams that cancel their
request when the client goes away). While the replica drains, generation routes answer 503.

``HttpServer`` runs the app with uvicorn in a thread of the server process: keep-alive
connections idle for ``keep_alive_s`` are closed, and beyond ``max_connections`` concurrent
connections new requests get 503.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from hotmerge import __version__
from hotmerge.api.core import RequestPath
from hotmerge.api.http_common import HttpContext
from hotmerge.api.routes_admin import add_admin_routes
from hotmerge.api.routes_lorax import add_lorax_routes
from hotmerge.api.routes_openai import add_openai_routes
from hotmerge.lifecycle import Lifecycle
from hotmerge.metrics import Metrics


def create_app(
    path: RequestPath,
    lifecycle: Lifecycle,
    metrics: Metrics,
    *,
    model_name: str | None = None,
) -> FastAPI:
    """The app. ``model_name``: what OpenAI's ``model`` calls the base model (besides the model
    id and its directory name)."""
    app = FastAPI(title="hotmerge", version=__version__, docs_url=None, redoc_url=None)
    ctx = HttpContext(path, lifecycle, metrics)
    add_lorax_routes(app, ctx)
    add_openai_routes(app, ctx, model_name)
    add_admin_routes(app, ctx)
    return app


class HttpServer:
    """Runs an ASGI app with uvicorn in a daemon thread; the socket is bound before it returns
    (port 0: any free port, see ``port``)."""

    def __init__(
        self,
        app: FastAPI,
        *,
        host: str,
        port: int,
        keep_alive_s: float = 5.0,
        max_connections: int = 1024,
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            raise OSError(
                f"cannot listen on {host}:{port} for HTTP: {exc} (port in use?)"
            ) from None
        self._sock.listen(2048)
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_keep_alive=keep_alive_s,
            limit_concurrency=max_connections,
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._sock]},
            name="hotmerge-http",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._server.started:
            raise OSError(f"the HTTP server on {host}:{self.port} did not start")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()
