"""An optional API key (``--api-key``), checked on both fronts; health and metrics stay open.

HTTP: ``Authorization: Bearer KEY`` (what the OpenAI clients send as ``api_key``); gRPC:
metadata ``authorization: Bearer KEY``. A call without the key, or with another, is refused
before any work: HTTP 401, gRPC UNAUTHENTICATED. Keys compare in constant time.
"""

from __future__ import annotations

import hmac

import grpc

from hotmerge.api.grpc_wire import wrap_handler
from hotmerge.headers import AUTHORIZATION_HEADER

# Probes, scrapes and service discovery need no key.
OPEN_HTTP_PATHS = frozenset(("/healthz", "/readyz", "/health", "/metrics"))
OPEN_GRPC_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
MISSING = "missing or wrong API key: send 'Authorization: Bearer KEY' (gRPC: metadata)"


def key_matches(header: str | None, key: str) -> bool:
    """Whether an ``Authorization`` value carries ``key`` as a bearer token."""
    if not header:
        return False
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), key.encode())


async def _deny(request, context) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, MISSING)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without the key (health and reflection excepted)."""

    def __init__(self, key: str) -> None:
        self.key = key

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_GRPC_PREFIXES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        if key_matches(metadata.get(AUTHORIZATION_HEADER), self.key):
            return handler
        if handler.request_streaming:
            return handler  # no streaming-request methods are guarded here
        return wrap_handler(handler, _deny)
