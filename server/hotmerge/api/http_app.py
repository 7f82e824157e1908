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
Before any route, ``http_guard.HttpGuard`` checks the connection cap, the API key, and the
body's type and size; unknown routes and methods answer in the front's error JSON too.

``HttpServer`` runs the app with uvicorn in a thread of the server process: keep-alive
connections idle for ``keep_alive_s`` are closed, and beyond ``max_connections`` concurrent
connections new requests get 503.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hotmerge import __version__
from hotmerge.api.core import RequestPath
from hotmerge.api.http_common import HttpContext
from hotmerge.api.http_guard import HttpGuard, IdleClosingProtocol, error_body_for
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
    api_key: str | None = None,
    max_body_bytes: int = 4 * 1024**2,
) -> FastAPI:
    """The app. ``model_name``: what OpenAI's ``model`` calls the base model (besides the model
    id and its directory name). ``api_key``, ``max_body_bytes`` and the connection cap are
    checked by ``HttpGuard`` before any route (``app.state.open_connections`` is set by
    ``HttpServer``)."""
    app = FastAPI(title="hotmerge", version=__version__, docs_url=None, redoc_url=None)
    app.state.open_connections = None  # () -> int, and the cap: set by HttpServer
    app.state.max_connections = None
    app.add_middleware(HttpGuard, api_key=api_key, max_body_bytes=max_body_bytes, state=app.state)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        where = request.url.path
        message = {404: f"no route {where}", 405: f"{request.method} is not allowed on {where}"}
        message = message.get(exc.status_code, str(exc.detail))
        body = error_body_for(request.url.path, exc.status_code, message)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        status = 400 if request.url.path.startswith("/v1/") else 422
        return JSONResponse(error_body_for(request.url.path, status, str(exc)), status_code=status)

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
            http=IdleClosingProtocol,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_keep_alive=keep_alive_s,
            # A hard ceiling for file descriptors; below it HttpGuard answers 503 to all but
            # health and metrics past max_connections.
            limit_concurrency=2 * max_connections + 64,
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        app.state.open_connections = lambda: len(self._server.server_state.connections)
        app.state.max_connections = max_connections
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
