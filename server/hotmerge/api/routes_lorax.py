"""LoRAX's routes: ``POST /generate``, ``/generate_stream`` (SSE), ``/`` (dispatches on
``stream``), ``GET /health``, ``/info``. The wire format is ``lorax.py``'s."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from hotmerge import __version__
from hotmerge.api import lorax
from hotmerge.api.async_handle import token_events
from hotmerge.api.http_common import (
    LORAX,
    HttpContext,
    body_schema,
    merge_headers,
    parse_body,
    sse,
)
from hotmerge.api.http_guard import ClientWatch


def add_lorax_routes(app: FastAPI, ctx: HttpContext) -> None:
    path = ctx.path

    async def lorax_generate(request: Request, *, as_list: bool, method: str) -> Response:
        async def work(request_id, done):
            body = await parse_body(request, lorax.GenerateRequest, LORAX)
            gen, merged = lorax.to_request(body, path)
            watch = ClientWatch(request)
            sub = await ctx.submit(request, gen, merged, lorax.WIRE, watch)
            result = await ctx.wait(sub, watch)
            path.finished(request_id, method, sub)
            out = lorax.response(sub, result, full_text=body.parameters.return_full_text)
            return JSONResponse([out] if as_list else out, headers=merge_headers(sub.merge))

        return await ctx.call(LORAX, method, request, work)

    async def lorax_stream(request: Request, *, method: str, body=None) -> Response:
        async def work(request_id, done):
            parsed = body or await parse_body(request, lorax.GenerateRequest, LORAX)
            gen, merged = lorax.to_request(parsed, path)
            sub = await ctx.submit(request, gen, merged, lorax.WIRE)

            async def events():
                last = None
                async for event in token_events(sub.handle):
                    if last is not None:
                        yield sse(lorax.stream_token(last))
                    last = event
                yield sse(lorax.stream_final(sub, last, sub.handle.result))

            return ctx.stream(sub, events(), LORAX, method, request_id, done)

        return await ctx.call(LORAX, method, request, work)

    schema = body_schema(lorax.GenerateRequest)

    @app.post("/generate", openapi_extra=schema)
    async def generate(request: Request):
        return await lorax_generate(request, as_list=False, method="POST /generate")

    @app.post("/generate_stream", openapi_extra=schema)
    async def generate_stream(request: Request):
        return await lorax_stream(request, method="POST /generate_stream")

    @app.post("/", openapi_extra=schema)
    async def compat_generate(request: Request):
        """LoRAX's (and lorax-client's) route: ``stream`` picks SSE or a one-element list."""
        try:
            streaming = bool((await request.json()).get("stream"))
        except (ValueError, AttributeError, UnicodeDecodeError, RecursionError):
            streaming = False  # the parse in the handler reports it
        if streaming:
            return await lorax_stream(request, method="POST /")
        return await lorax_generate(request, as_list=True, method="POST /")

    @app.get("/health")
    async def health():
        if not ctx.lifecycle.ready:
            return JSONResponse(
                lorax.error_body(503, f"not ready: {ctx.lifecycle.state.value}"), status_code=503
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

        return await ctx.call(LORAX, "GET /info", request, work, generation=False)
