"""What every HTTP route shares: error mapping, the request wrapper, submit / wait / stream.

``HttpContext.call`` runs a route's work, turning errors into the front's error JSON (with the
request id) and counting the request; generation routes count as in flight for draining until
their stream ends. Engine calls block (merges, adapter loads, waiting for tokens), so they run in
worker threads; a stream whose client goes away cancels its request.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pydantic
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from hotmerge.api import lorax, openai
from hotmerge.api.async_handle import result as handle_result
from hotmerge.api.core import RequestPath, Submission, request_id_or_new
from hotmerge.api.http_guard import (
    ClientWatch,
    front_message,
    has_lone_surrogate,
    request_deadline,
)
from hotmerge.errors import HotmergeError
from hotmerge.generation import GenerationRequest
from hotmerge.headers import MERGE_CACHE_KEY_HEADER, MERGE_KEY_HEADER, REQUEST_ID_HEADER
from hotmerge.lifecycle import Lifecycle
from hotmerge.merging.merger import MergeOutcome
from hotmerge.metrics import Metrics
from hotmerge.request_rules import Wire
from hotmerge.v1 import hotmerge_pb2 as pb

log = logging.getLogger(__name__)


class HttpError(Exception):
    """An error found by the HTTP layer itself (body not JSON, schema mismatch)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Front:
    """A wire format's error shape and the status of a validation error."""

    name: str
    error_body: Callable[[int, str], dict]
    invalid_status: int  # LoRAX answers bad parameters with 422, OpenAI with 400


LORAX = Front("lorax", lorax.error_body, 422)
OPENAI = Front("openai", openai.error_body, 400)

_STATUS = {
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,  # X-Request-Timeout passed
    grpc.StatusCode.CANCELLED: 499,  # the client went away (nginx's "client closed request")
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


def status_of(err: Exception, front: Front) -> tuple[int, str]:
    """(HTTP status, gRPC code name for metrics) of an error."""
    if isinstance(err, HttpError):
        return err.status, "INVALID_ARGUMENT"
    if isinstance(err, HotmergeError):
        if err.code == grpc.StatusCode.INVALID_ARGUMENT:
            return front.invalid_status, err.code.name
        return _STATUS.get(err.code, 500), err.code.name
    return 500, "INTERNAL"


def error_message(err: Exception, status: int, request_id: str) -> str:
    if status == 500:  # details stay in the log
        return f"internal error (request id {request_id}); the server log has details"
    return str(err)


async def parse_body(request: Request, model: type[pydantic.BaseModel], front: Front):
    try:
        data = await request.json()
    except RecursionError:
        raise HttpError(400, "the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise HttpError(400, "the request body is not valid JSON") from None
    if has_lone_surrogate(data):
        raise HttpError(400, "the request body has a lone UTF-16 surrogate (\\ud800-\\udfff)")
    try:
        return model.model_validate(data)
    except RecursionError:
        raise HttpError(400, "the request body is nested too deeply") from None
    except pydantic.ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in err.errors()
        )
        raise HttpError(front.invalid_status, problems) from None


def body_schema(model: type[pydantic.BaseModel]) -> dict[str, Any]:
    """The route's JSON body in the OpenAPI document (routes parse bodies themselves, so
    FastAPI cannot see them): what clients and the schema fuzz test read."""
    schema = {"schema": model.model_json_schema()}
    return {"requestBody": {"required": True, "content": {"application/json": schema}}}


def merge_headers(outcome: MergeOutcome | None) -> dict[str, str]:
    if outcome is None:
        return {}
    return {MERGE_KEY_HEADER: outcome.affinity_key, MERGE_CACHE_KEY_HEADER: outcome.merge_key}


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, allow_nan=False)}\n\n"


def spec_json(msg) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(msg, preserving_proto_field_name=True)


Work = Callable[[str, Callable[[], None]], Awaitable[Response]]


class HttpContext:
    """The request path, lifecycle and metrics the routes share, and the calls they make."""

    def __init__(self, path: RequestPath, lifecycle: Lifecycle, metrics: Metrics) -> None:
        self.path, self.lifecycle, self.metrics = path, lifecycle, metrics

    def error(self, front: Front, err: Exception, method, request_id, started, *, observe=True):
        status, code = status_of(err, front)
        if status == 500:
            log.error("request %s %s failed", request_id, method, exc_info=err)
        else:
            log.info("request %s %s: %d %s", request_id, method, status, err)
        if observe:
            self.metrics.observe_request(method, code, time.perf_counter() - started)
        message = front_message(front.name, error_message(err, status, request_id))
        body = front.error_body(status, message)
        return JSONResponse(body, status_code=status, headers={REQUEST_ID_HEADER: request_id})

    async def call(
        self, front: Front, method: str, request: Request, work: Work, *, generation: bool = True
    ) -> Response:
        """Run ``work(request_id, done)`` turning errors into the front's error JSON. For
        generation routes the request counts as in flight (refused while draining) until
        ``done`` is called: by the wrapper, or by a stream at its end."""
        request_id = request_id_or_new(request.headers.get(REQUEST_ID_HEADER))
        started = time.perf_counter()
        if generation and not self.lifecycle.enter():
            err = HotmergeError("this replica is draining (shutting down); retry on another")
            err.code = grpc.StatusCode.UNAVAILABLE
            return self.error(front, err, method, request_id, started)
        finished = threading.Event()

        def done(code: str = "OK") -> None:
            if not finished.is_set():
                finished.set()
                self.metrics.observe_request(method, code, time.perf_counter() - started)
                if generation:
                    self.lifecycle.exit()

        streaming = False
        try:
            response = await work(request_id, done)
            streaming = isinstance(response, StreamingResponse)
            response.headers[REQUEST_ID_HEADER] = request_id
            return response
        except Exception as err:
            done(status_of(err, front)[1])  # counted and out of flight on this path too
            return self.error(front, err, method, request_id, started, observe=False)
        finally:
            if not streaming:
                done()

    async def submit(
        self,
        http: Request,
        request: GenerationRequest,
        merged: pb.MergedAdapters | None,
        wire: Wire,
        watch: ClientWatch | None = None,
    ) -> Submission:
        """Submit with the HTTP request's deadline; while a merge runs, a client that leaves
        stops it (``watch``), and the handle is cancelled when the client goes."""
        deadline = request_deadline(http)
        if watch is not None:
            watch.start()
        sub = await run_in_threadpool(
            functools.partial(
                self.path.submit,
                request,
                merged_adapters=merged,
                wire=wire,
                deadline=deadline,
                cancelled=watch.gone.is_set if watch is not None else None,
            )
        )
        if watch is not None:
            watch.handles.append(sub.handle)
            if watch.gone.is_set():
                sub.handle.cancel()
        return sub

    @staticmethod
    async def wait(sub: Submission, watch: ClientWatch | None = None):
        try:
            return await handle_result(sub.handle)
        finally:
            if sub.handle.result is None:
                sub.handle.cancel()
            if watch is not None:
                watch.stop()

    def stream(self, sub, events: AsyncIterator[str], front, method, request_id, done) -> Response:
        async def body() -> AsyncIterator[str]:
            code = "OK"
            try:
                async for chunk in events:
                    yield chunk
                self.path.finished(request_id, method, sub)
            except Exception as err:  # after the headers went: report it in the stream
                status, code = status_of(err, front)
                message = front_message(front.name, error_message(err, status, request_id))
                yield sse(front.error_body(status, message))
            finally:
                if sub.handle.result is None:
                    sub.handle.cancel()  # the client went away, or the request failed
                    code = code if code != "OK" else "CANCELLED"
                done(code)

        return StreamingResponse(
            body(), media_type="text/event-stream", headers=merge_headers(sub.merge)
        )
