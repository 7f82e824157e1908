"""Errors that carry their gRPC status: raised anywhere, turned into a status by the service."""

from __future__ import annotations

import grpc


class HotmergeError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(HotmergeError):
    """Bad input; the message names the field and the fix."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(HotmergeError):
    code = grpc.StatusCode.NOT_FOUND


class Unavailable(HotmergeError):
    """The server cannot take the request now (draining, shutting down); retry elsewhere."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(HotmergeError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Cancelled(HotmergeError):
    """The client cancelled or its deadline passed; the work for it was stopped."""

    code = grpc.StatusCode.CANCELLED


class DeadlineExceeded(HotmergeError):
    """The request's deadline passed while it waited or worked; the work for it was stopped."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
