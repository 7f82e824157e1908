"""What the gRPC server does around every handler (``grpc.aio`` interceptors' shared part), and
requests that do not parse: INVALID_ARGUMENT, not INTERNAL.

``wrap_handler`` gives a handler a gate (awaited first; it may abort the RPC) and a call when the
handler ends, keeping its kind (a coroutine, or an async generator for a stream); the API key,
the drain and the decode check below are built on it.

grpc runs a handler's ``request_deserializer`` before the handler, and answers INTERNAL
("Exception deserializing request!") when it raises. ``DecodeErrorInterceptor`` wraps every
unary-request handler's deserializer so that it returns a ``_Malformed`` marker instead, and the
handler so that the marker is answered with INVALID_ARGUMENT and the parser's reason.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable

import grpc

log = logging.getLogger(__name__)

Gate = Callable[[object, grpc.aio.ServicerContext], Awaitable[None]]


def wrap_handler(
    handler: grpc.RpcMethodHandler, gate: Gate, done: Callable[[], None] | None = None, **fields
) -> grpc.RpcMethodHandler:
    """``handler`` (a unary-request one) behind ``gate`` and followed by ``done()`` (only when
    the gate let it run); ``fields`` replace others of the handler (its deserializer)."""

    def wrapped(inner):
        if inspect.isasyncgenfunction(inner):

            async def stream(request, context):
                await gate(request, context)
                try:
                    async for item in inner(request, context):
                        yield item
                finally:
                    if done is not None:
                        done()

            return stream

        async def unary(request, context):  # a coroutine (a unary reply, or a stream by write)
            await gate(request, context)
            try:
                return await inner(request, context)
            finally:
                if done is not None:
                    done()

        return unary

    if handler.unary_unary is not None:
        return handler._replace(unary_unary=wrapped(handler.unary_unary), **fields)
    return handler._replace(unary_stream=wrapped(handler.unary_stream), **fields)


class _Malformed:
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _message(method: str, bad: _Malformed) -> str:
    return f"the request to {method} is not a valid protobuf message ({bad.reason})"


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        parse = handler.request_deserializer

        def deserialize(data: bytes):
            try:
                return parse(data)
            except Exception as exc:  # DecodeError, bad UTF-8 in a string field, ...
                return _Malformed(str(exc) or type(exc).__name__)

        async def parsed(request, context) -> None:
            if isinstance(request, _Malformed):
                log.info("%s: malformed request: %s", method, request.reason)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(method, request))

        return wrap_handler(handler, parsed, request_deserializer=deserialize)
