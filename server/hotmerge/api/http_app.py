"""The HTTP server: LoRAX REST, OpenAI-compatible routes, named merges, health and metrics.

    POST /generate, /generate_stream (SSE), /  (LoRAX; ``/`` dispatches on ``stream``)
    GET  /health, /info                          (LoRAX)
    POST /v1/completions, /v1/chat/completions   (OpenAI; ``stream`` for SSE)
    GET  /v1/models                              (OpenAI: base model, adapters, named merges)
    POST /merges, GET /merges                    (register and list named merges)
    GET  /metrics, /healthz, /readyz             (Prometheus; liveness; readiness)

Every route translates its wire format (``lorax.py``, ``openai.py``) and calls the request
path (``core.py``) that the gRPC service calls too. Engine calls block (merges, adapter loads,
waiting for tokens), so they run in worker threads; a stream whose client goes away cancels its
request. While the replica drains, generation routes answer 503.

``HttpServer`` runs the app with uvicorn in a thread of the server process: keep-alive
connections idle for ``keep_alive_s`` are closed, and beyond ``max_connections`` concurrent
connections new requests get 503.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pydantic
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from hotmerge import __version__
from hotmerge.api import lorax, openai
from hotmerge.api.core import RequestPath, Submission, new_request_id
from hotmerge.errors import HotmergeError, InvalidArgument
from hotmerge.lifecycle import Lifecycle
from hotmerge.merging.merger import MergeOutcome
from hotmerge.merging.spec import merged_adapters_from_dict
from hotmerge.metrics import Metrics

log = logging.getLogger(__name__)

MERGE_KEY_HEADER = "x-merge-key"
MERGE_CACHE_KEY_HEADER = "x-merge-cache-key"
REQUEST_ID_HEADER = "x-request-id"


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


def _message(err: Exception, status: int, request_id: str) -> str:
    if status == 500:  # details stay in the log
        return f"internal error (request id {request_id}); the server log has details"
    return str(err)


async def parse_body(request: Request, model: type[pydantic.BaseModel], front: Front):
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise HttpError(400, "the request body is not valid JSON") from None
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in err.errors()
        )
        raise HttpError(front.invalid_status, problems) from None


def merge_headers(outcome: MergeOutcome | None) -> dict[str, str]:
    if outcome is None:
        return {}
    return {MERGE_KEY_HEADER: outcome.affinity_key, MERGE_CACHE_KEY_HEADER: outcome.merge_key}


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, allow_nan=False)}\n\n"


async def _tokens(sub: Submission) -> AsyncIterator:
    """The handle's token events, each waited for in a worker thread."""
    events = iter(sub.handle)
    while (event := await run_in_threadpool(next, events, None)) is not None:
        yield event


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

    def base_names() -> set[str]:
        model_id = path.ready_engine().runner.model_id
        names = {model_id, Path(model_id).name}
        return names | ({model_name} if model_name else set())

    def error(front: Front, err: Exception, method: str, request_id: str, started: float):
        status, code = status_of(err, front)
        if status == 500:
            log.error("request %s %s failed", request_id, method, exc_info=err)
        else:
            log.info("request %s %s: %d %s", request_id, method, status, err)
        metrics.observe_request(method, code, time.perf_counter() - started)
        body = front.error_body(status, _message(err, status, request_id))
        return JSONResponse(body, status_code=status, headers={REQUEST_ID_HEADER: request_id})

    async def call(
        front: Front,
        method: str,
        request: Request,
        work: Callable[[str, Callable[[], None]], Awaitable[Response]],
        *,
        generation: bool = True,
    ) -> Response:
        """Run ``work(request_id, done)`` turning errors into the front's error JSON. For
        generation routes the request counts as in flight (refused while draining) until
        ``done`` is called: by the wrapper, or by a stream at its end."""
        request_id = request.headers.get(REQUEST_ID_HEADER, "")[:64] or new_request_id()
        started = time.perf_counter()
        if generation and not lifecycle.enter():
            err = HotmergeError("this replica is draining (shutting down); retry on another")
            err.code = grpc.StatusCode.UNAVAILABLE
            return error(front, err, method, request_id, started)
        finished = threading.Event()

        def done(code: str = "OK") -> None:
            if not finished.is_set():
                finished.set()
                metrics.observe_request(method, code, time.perf_counter() - started)
                if generation:
                    lifecycle.exit()

        streaming = False
        try:
            response = await work(request_id, done)
            streaming = isinstance(response, StreamingResponse)
            response.headers[REQUEST_ID_HEADER] = request_id
            return response
        except Exception as err:
            finished.set()
            return error(front, err, method, request_id, started)
        finally:
            if not streaming:
                done()

    async def submit(request, merged) -> Submission:
        return await run_in_threadpool(path.submit, request, merged_adapters=merged)

    async def wait(sub: Submission):
        try:
            return await run_in_threadpool(sub.handle.wait)
        finally:
            if sub.handle.result is None:
                sub.handle.cancel()

    def stream(sub, events: AsyncIterator[str], front, method, request_id, done) -> Response:
        async def body() -> AsyncIterator[str]:
            code = "OK"
            try:
                async for chunk in events:
                    yield chunk
                path.finished(request_id, method, sub)
            except Exception as err:  # after the headers went: report it in the stream
                status, code = status_of(err, front)
                yield sse(front.error_body(status, _message(err, status, request_id)))
            finally:
                if sub.handle.result is None:
                    sub.handle.cancel()  # the client went away, or the request failed
                    code = code if code != "OK" else "CANCELLED"
                done(code)

        return StreamingResponse(
            body(), media_type="text/event-stream", headers=merge_headers(sub.merge)
        )

    # -- LoRAX ------------------------------------------------------------------------------

    async def lorax_generate(request: Request, *, as_list: bool, method: str) -> Response:
        async def work(request_id, done):
            body = await parse_body(request, lorax.GenerateRequest, LORAX)
            gen, merged = lorax.to_request(body, path)
            sub = await submit(gen, merged)
            result = await wait(sub)
            path.finished(request_id, method, sub)
            out = lorax.response(sub, result, full_text=body.parameters.return_full_text)
            return JSONResponse([out] if as_list else out, headers=merge_headers(sub.merge))

        return await call(LORAX, method, request, work)

    async def lorax_stream(request: Request, *, method: str, body=None) -> Response:
        async def work(request_id, done):
            parsed = body or await parse_body(request, lorax.GenerateRequest, LORAX)
            gen, merged = lorax.to_request(parsed, path)
            sub = await submit(gen, merged)

            async def events():
                last = None
                async for event in _tokens(sub):
                    if last is not None:
                        yield sse(lorax.stream_token(last))
                    last = event
                yield sse(lorax.stream_final(sub, last, sub.handle.result))

            return stream(sub, events(), LORAX, method, request_id, done)

        return await call(LORAX, method, request, work)

    @app.post("/generate")
    async def generate(request: Request):
        return await lorax_generate(request, as_list=False, method="POST /generate")

    @app.post("/generate_stream")
    async def generate_stream(request: Request):
        return await lorax_stream(request, method="POST /generate_stream")

    @app.post("/")
    async def compat_generate(request: Request):
        """LoRAX's (and lorax-client's) route: ``stream`` picks SSE or a one-element list."""
        try:
            streaming = bool((await request.json()).get("stream"))
        except (ValueError, AttributeError, UnicodeDecodeError):
            streaming = False  # the parse in the handler reports it
        if streaming:
            return await lorax_stream(request, method="POST /")
        return await lorax_generate(request, as_list=True, method="POST /")

    @app.get("/health")
    async def health():
        if not lifecycle.ready:
            return JSONResponse(
                lorax.error_body(503, f"not ready: {lifecycle.state.value}"), status_code=503
            )
        return Response(status_code=200)

    @app.get("/info")
    async def info(request: Request):
        async def work(request_id, done):
            engine = path.ready_engine()
            runner = engine.runner
            return JSONResponse(
                {
                    "model_id": runner.model_id,
                    "model_dtype": str(runner.dtype).removeprefix("torch."),
                    "model_device_type": runner.device.type,
                    "max_input_length": engine.max_input_tokens,
                    "max_total_tokens": engine.max_total_tokens,
                    "max_batch_size": engine.max_batch_size,
                    "default_max_new_tokens": path.default_max_new_tokens,
                    "max_merge_adapters": path.max_merge_adapters,
                    "version": __version__,
                    "router": "hotmerge",
                }
            )

        return await call(LORAX, "GET /info", request, work, generation=False)

    # -- OpenAI -----------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(request: Request):
        method = "POST /v1/completions"

        async def work(request_id, done):
            body = await parse_body(request, openai.CompletionRequest, OPENAI)
            gens, merged = openai.completion_requests(body, path, base_names())
            tokenizer = path.ready_engine().runner.tokenizer
            if body.stream:
                if len(gens) != 1:
                    raise InvalidArgument("stream takes one prompt, got a batch")
                sub = await submit(gens[0], merged)
                cid = f"cmpl-{request_id}"

                async def events():
                    async for event in _tokens(sub):
                        choice = {"index": 0, "text": event.text, "logprobs": None}
                        yield sse(
                            openai.chunk(
                                "completion", cid, body.model, choice | {"finish_reason": None}
                            )
                        )
                    result = sub.handle.result
                    final = {"index": 0, "text": "", "logprobs": None}
                    final["finish_reason"] = openai.FINISH_REASONS[result.finish_reason]
                    yield sse(openai.chunk("completion", cid, body.model, final))
                    yield "data: [DONE]\n\n"

                return stream(sub, events(), OPENAI, method, request_id, done)
            subs: list[Submission] = []
            try:
                for gen in gens:  # all queued before waiting, so the engine batches them
                    subs.append(await submit(gen, merged))
                results = [await wait(s) for s in subs]
            finally:
                for s in subs:
                    if s.handle.result is None:
                        s.handle.cancel()
            choices, generated = [], []
            for i, (sub, result) in enumerate(zip(subs, results, strict=True)):
                path.finished(request_id, method, sub)
                choice, n = openai.completion_choice(i, sub, result, body, tokenizer)
                choices.append(choice)
                generated.append(n)
            out = openai.completion_response(
                body.model, choices, openai.usage(results, generated=generated)
            )
            return JSONResponse(out, headers=merge_headers(subs[0].merge))

        return await call(OPENAI, method, request, work)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        method = "POST /v1/chat/completions"

        async def work(request_id, done):
            body = await parse_body(request, openai.ChatRequest, OPENAI)
            tokenizer = path.ready_engine().runner.tokenizer
            gen, merged = openai.chat_request(body, path, base_names(), tokenizer)
            sub = await submit(gen, merged)
            if not body.stream:
                result = await wait(sub)
                path.finished(request_id, method, sub)
                out = openai.chat_response(body.model, result)
                return JSONResponse(out, headers=merge_headers(sub.merge))
            cid = f"chatcmpl-{request_id}"
            include_usage = bool((body.stream_options or {}).get("include_usage"))

            async def events():
                first = {"role": "assistant", "content": ""}
                yield sse(
                    openai.chunk(
                        "chat", cid, body.model, {"index": 0, "delta": first, "finish_reason": None}
                    )
                )
                async for event in _tokens(sub):
                    delta = {"content": event.text}
                    yield sse(
                        openai.chunk(
                            "chat",
                            cid,
                            body.model,
                            {"index": 0, "delta": delta, "finish_reason": None},
                        )
                    )
                result = sub.handle.result
                reason = openai.FINISH_REASONS[result.finish_reason]
                yield sse(
                    openai.chunk(
                        "chat", cid, body.model, {"index": 0, "delta": {}, "finish_reason": reason}
                    )
                )
                if include_usage:
                    last = openai.chunk("chat", cid, body.model, {})
                    last["choices"] = []
                    last["usage"] = openai.usage([result], generated=[result.generated_tokens])
                    yield sse(last)
                yield "data: [DONE]\n\n"

            return stream(sub, events(), OPENAI, method, request_id, done)

        return await call(OPENAI, method, request, work)

    @app.get("/v1/models")
    async def models(request: Request):
        async def work(request_id, done):
            engine = path.ready_engine()
            base = model_name or engine.runner.model_id
            data = [{"id": base, "object": "model", "created": 0, "owned_by": "hotmerge"}]
            adapters = await run_in_threadpool(path.ready_store().list)
            for a in adapters:
                data.append(
                    {"id": a.id, "object": "model", "created": 0, "owned_by": "hotmerge",
                     "parent": base, "root": a.id}
                )  # fmt: skip
            for m in path.named.list():
                data.append(
                    {"id": m.name, "object": "model", "created": 0, "owned_by": "hotmerge",
                     "parent": base, "root": m.name, "named_merge": _spec_json(m.message)}
                )  # fmt: skip
            return JSONResponse({"object": "list", "data": data})

        return await call(OPENAI, "GET /v1/models", request, work, generation=False)

    # -- named merges -----------------------------------------------------------------------

    class MergeBody(pydantic.BaseModel):
        name: str = ""
        merged_adapters: dict[str, Any]

    @app.post("/merges")
    async def register_merge(request: Request):
        async def work(request_id, done):
            body = await parse_body(request, MergeBody, LORAX)
            msg = merged_adapters_from_dict(body.merged_adapters)
            outcome, _ = await run_in_threadpool(path.merge, msg, body.name)
            log.info("request %s POST /merges %s=%s", request_id, body.name, outcome.merge_key)
            return JSONResponse(
                {
                    "name": body.name,
                    "merge_key": outcome.merge_key,
                    "affinity_key": outcome.affinity_key,
                    "rank": outcome.rank,
                    "bytes": outcome.nbytes,
                    "cache_hit": outcome.cache_hit,
                    "merge_ms": outcome.merge_ms,
                    "adapter_load_ms": outcome.adapter_load_ms,
                },
                headers=merge_headers(outcome),
            )

        return await call(LORAX, "POST /merges", request, work, generation=False)

    @app.get("/merges")
    async def list_merges(request: Request):
        async def work(request_id, done):
            path.ready_engine()
            merges = {m.name: _spec_json(m.message) for m in path.named.list()}
            return JSONResponse({"merges": merges})

        return await call(LORAX, "GET /merges", request, work, generation=False)

    # -- health and metrics -----------------------------------------------------------------

    @app.get("/healthz")
    async def healthz():
        return PlainTextResponse("ok\n")

    @app.get("/readyz")
    async def readyz():
        return PlainTextResponse(
            f"{lifecycle.state.value}\n", status_code=200 if lifecycle.ready else 503
        )

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


def _spec_json(msg) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(msg, preserving_proto_field_name=True)


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
