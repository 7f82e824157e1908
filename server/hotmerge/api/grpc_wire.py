"""Requests that do not parse are INVALID_ARGUMENT, not INTERNAL.

grpc runs a handler's ``request_deserializer`` before the handler, and answers INTERNAL
("Exception deserializing request!") when it raises. ``DecodeErrorInterceptor`` wraps every
unary-request handler's deserializer so that it returns a ``_Malformed`` marker instead, and the
handler so that the marker is answered with INVALID_ARGUMENT and the parser's reason.
"""

from __future__ import annotations

import logging

import grpc

log = logging.getLogger(__name__)


class _Malformed:
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _message(method: str, bad: _Malformed) -> str:
    return f"the request to {method} is not a valid protobuf message ({bad.reason})"


class DecodeErrorInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        parse = handler.request_deserializer

        def deserialize(data: bytes):
            try:
                return parse(data)
            except Exception as exc:  # DecodeError, bad UTF-8 in a string field, ...
                return _Malformed(str(exc) or type(exc).__name__)

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            def unary(request, context):
                if isinstance(request, _Malformed):
                    log.info("%s: malformed request: %s", method, request.reason)
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(method, request))
                return inner(request, context)

            return handler._replace(request_deserializer=deserialize, unary_unary=unary)
        inner_stream = handler.unary_stream

        def stream(request, context):
            if isinstance(request, _Malformed):
                log.info("%s: malformed request: %s", method, request.reason)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(method, request))
            yield from inner_stream(request, context)

        return handler._replace(request_deserializer=deserialize, unary_stream=stream)
