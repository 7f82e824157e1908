"""What every HTTP request passes before a route sees it (an ASGI middleware).

In order: the connection cap (beyond ``max_connections`` open connections, routes other than
health and metrics answer 503, so probes and scrapes still get through a flood); the API key
(401); for bodies, the content type (JSON only: 415) and the size (``max_body_bytes``: 413,
checked on Content-Length and again while reading, so a chunked or lying body is cut off too).
The body is read here, whole and bounded, and replayed to the route; a client that leaves
mid-body gets 400 rather than an error inside a route.

Also here, for the routes: the request's deadline (``X-Request-Timeout``), ``ClientWatch``
(cancel the work when the client leaves, also for non-streaming calls), the check for lone
surrogates, OpenAI's own field names in messages, and a uvicorn protocol that closes a
connection that never sends a request.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import time
from typing import Any

from starlette.requests import Request
from uvicorn.protocols.http.h11_impl import H11Protocol

from hotmerge.api import lorax, openai
from hotmerge.api.auth import MISSING, OPEN_HTTP_PATHS, key_matches
from hotmerge.errors import InvalidArgument
from hotmerge.headers import AUTHORIZATION_HEADER, TIMEOUT_HEADER

_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))
MAX_TIMEOUT_S = 3600.0


def error_body_for(path: str, status: int, message: str) -> dict:
    """The front's error JSON: OpenAI's shape under /v1, LoRAX's elsewhere."""
    front = openai if path.startswith("/v1/") else lorax
    return front.error_body(status, message)


def _json_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media in ("", "application/json") or media.endswith("+json")


class HttpGuard:
    def __init__(
        self,
        app,
        *,
        api_key: str | None,
        max_body_bytes: int,
        state: Any = None,
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        # The connection cap, read per request: state.open_connections () -> int and
        # state.max_connections, set once the server runs (None: no cap).
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        exempt = path in OPEN_HTTP_PATHS

        async def refuse(status: int, message: str, extra: dict | None = None) -> None:
            body = json.dumps(error_body_for(path, status, message)).encode()
            head = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]
            head += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
            await send({"type": "http.response.start", "status": status, "headers": head})
            await send({"type": "http.response.body", "body": body})

        count = getattr(self.state, "open_connections", None)
        cap = getattr(self.state, "max_connections", None)
        if not exempt and count is not None and cap is not None and count() > cap:
            return await refuse(503, "too many open connections; retry later")
        if (
            self.api_key
            and not exempt
            and not key_matches(headers.get(AUTHORIZATION_HEADER), self.api_key)
        ):
            return await refuse(401, MISSING, {"www-authenticate": "Bearer"})
        if scope.get("method") not in _BODY_METHODS:
            return await self.app(scope, receive, send)
        if not _json_type(headers.get("content-type", "")):
            return await refuse(
                415,
                f"the body's content type is {headers['content-type']!r}; send JSON with "
                "'Content-Type: application/json'",
            )
        limit = self.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return await refuse(413, f"the body is {declared} bytes; at most {limit} accepted")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return await refuse(400, "the client closed the connection mid-body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await refuse(413, f"the body is over {limit} bytes, the most accepted")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the real stream: http.disconnect when it goes

        return await self.app(scope, replay, send)


# -- what routes use ----------------------------------------------------------------------


def has_lone_surrogate(data: Any, depth: int = 0) -> bool:
    """JSON may escape a lone surrogate (\\ud800); no UTF-8 text can carry one onwards."""
    if isinstance(data, str):
        return any("\ud800" <= c <= "\udfff" for c in data)
    if depth > 64:
        return False  # pydantic's depth limits reject it
    if isinstance(data, dict):
        return any(
            has_lone_surrogate(k) or has_lone_surrogate(v, depth + 1) for k, v in data.items()
        )
    if isinstance(data, list):
        return any(has_lone_surrogate(v, depth + 1) for v in data)
    return False


def request_deadline(request: Request) -> float | None:
    """The deadline (time.monotonic()) from the X-Request-Timeout header (seconds), if any."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (0 < seconds <= MAX_TIMEOUT_S):  # also false for nan
        raise InvalidArgument(
            f"header {TIMEOUT_HEADER} is {raw[:32]!r}: give seconds in (0, {MAX_TIMEOUT_S:g}]"
        )
    return time.monotonic() + seconds


class ClientWatch:
    """Whether the HTTP client is still there, polled while its request works: when it goes,
    its engine requests are cancelled (the path gRPC's cancel takes) and ``gone`` is set for
    merges to stop at their next chunk. Start it only once the body is read."""

    POLL_S = 0.1

    def __init__(self, request: Request) -> None:
        self.request = request
        self.gone = threading.Event()
        self.handles: list = []
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._poll())

    async def _poll(self) -> None:
        while not self.gone.is_set():
            if await self.request.is_disconnected():
                self.gone.set()
                for handle in self.handles:
                    handle.cancel()
                return
            await asyncio.sleep(self.POLL_S)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


class IdleClosingProtocol(H11Protocol):
    """uvicorn's h11 protocol, also closing a connection that sends nothing at all for the
    keep-alive timeout (uvicorn starts that timer only after a first response)."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )


def front_message(front: str, message: str) -> str:
    """OpenAI clients know ``max_tokens``, ``prompt`` and ``model``, not the request path's
    ``parameters.max_new_tokens``, ``inputs`` and ``adapter_id``."""
    if front != "openai":
        return message
    for internal, public in _OPENAI_NAMES:
        message = internal.sub(public, message)
    return message


_OPENAI_NAMES = [
    (re.compile(r"\bparameters\.max_new_tokens\b"), "max_tokens"),
    (re.compile(r"\bmax_new_tokens\b"), "max_tokens"),
    (re.compile(r"\bparameters\.(\w+)"), r"\1"),
    (re.compile(r"\binput_ids\b"), "prompt"),
    (re.compile(r"\binputs\b"), "prompt"),
    (re.compile(r"\badapter[_ ]id\b"), "model"),
    (re.compile(r"\badapter (?=')"), "model "),
]
