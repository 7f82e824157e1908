"""What every HTTP request passes before a route sees it (an ASGI middleware).

In order: the connection cap (beyond ``max_connections`` open connections, routes other than
health and metrics answer 503, so probes and scrapes still get through a flood); the API key
(401); for bodies, the content type (JSON only: 415) and the size (``max_body_bytes``: 413,
checked on Content-Length and again while reading, so a chunked or lying body is cut off too).
The body is read here, whole and bounded, and replayed to the route; a client that leaves
mid-body gets 400 rather than an error inside a route.
"""

from __future__ import annotations

import json
from typing import Any

from hotmerge.api import lorax, openai
from hotmerge.api.auth import MISSING, OPEN_HTTP_PATHS, key_matches

_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))


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
            and not key_matches(headers.get("authorization"), self.api_key)
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
