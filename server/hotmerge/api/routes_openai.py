"""OpenAI's routes: ``POST /v1/completions``, ``/v1/chat/completions`` (both with ``stream``),
``GET /v1/models`` (base model, adapters, named merges). The wire format is ``openai.py``'s."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from hotmerge.api import openai
from hotmerge.api.async_handle import token_events
from hotmerge.api.core import Submission
from hotmerge.api.http_common import (
    OPENAI,
    HttpContext,
    body_schema,
    merge_headers,
    parse_body,
    spec_json,
    sse,
)
from hotmerge.api.http_guard import ClientWatch
from hotmerge.errors import InvalidArgument


def add_openai_routes(app: FastAPI, ctx: HttpContext, model_name: str | None) -> None:
    """``model_name``: what ``model`` calls the base model (besides the model id and its
    directory name)."""
    path = ctx.path

    def base_names() -> set[str]:
        model_id = path.ready_engine().runner.model_id
        names = {model_id, Path(model_id).name}
        return names | ({model_name} if model_name else set())

    @app.post("/v1/completions", openapi_extra=body_schema(openai.CompletionRequest))
    async def completions(request: Request):
        method = "POST /v1/completions"

        async def work(request_id, done):
            body = await parse_body(request, openai.CompletionRequest, OPENAI)
            gens, merged = openai.completion_requests(body, path, base_names())
            tokenizer = path.ready_engine().runner.tokenizer
            wire = openai.COMPLETIONS_WIRE
            if body.stream:
                if len(gens) != 1:
                    raise InvalidArgument("stream takes one prompt, got a batch")
                sub = await ctx.submit(request, gens[0], merged, wire)
                cid = f"cmpl-{request_id}"

                async def events():
                    async for event in token_events(sub.handle):
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

                return ctx.stream(sub, events(), OPENAI, method, request_id, done)
            subs: list[Submission] = []
            watch = ClientWatch(request)
            try:
                for gen in gens:  # all queued before waiting, so the engine batches them
                    subs.append(await ctx.submit(request, gen, merged, wire, watch))
                results = [await ctx.wait(s) for s in subs]
            finally:
                watch.stop()
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

        return await ctx.call(OPENAI, method, request, work)

    @app.post("/v1/chat/completions", openapi_extra=body_schema(openai.ChatRequest))
    async def chat_completions(request: Request):
        method = "POST /v1/chat/completions"

        async def work(request_id, done):
            body = await parse_body(request, openai.ChatRequest, OPENAI)
            tokenizer = path.ready_engine().runner.tokenizer
            gen, merged = openai.chat_request(body, path, base_names(), tokenizer)
            watch = None if body.stream else ClientWatch(request)
            sub = await ctx.submit(request, gen, merged, openai.CHAT_WIRE, watch)
            if not body.stream:
                result = await ctx.wait(sub, watch)
                path.finished(request_id, method, sub)
                out = openai.chat_response(body.model, result)
                return JSONResponse(out, headers=merge_headers(sub.merge))
            cid = f"chatcmpl-{request_id}"
            include_usage = bool((body.stream_options or {}).get("include_usage"))

            def chunk(choice: dict) -> str:
                return sse(openai.chunk("chat", cid, body.model, choice))

            async def events():
                first = {"role": "assistant", "content": ""}
                yield chunk({"index": 0, "delta": first, "finish_reason": None})
                async for event in token_events(sub.handle):
                    delta = {"content": event.text}
                    yield chunk({"index": 0, "delta": delta, "finish_reason": None})
                result = sub.handle.result
                reason = openai.FINISH_REASONS[result.finish_reason]
                yield chunk({"index": 0, "delta": {}, "finish_reason": reason})
                if include_usage:
                    last = openai.chunk("chat", cid, body.model, {})
                    last["choices"] = []
                    last["usage"] = openai.usage([result], generated=[result.generated_tokens])
                    yield sse(last)
                yield "data: [DONE]\n\n"

            return ctx.stream(sub, events(), OPENAI, method, request_id, done)

        return await ctx.call(OPENAI, method, request, work)

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
                     "parent": base, "root": m.name, "named_merge": spec_json(m.message)}
                )  # fmt: skip
            return JSONResponse({"object": "list", "data": data})

        return await ctx.call(OPENAI, "GET /v1/models", request, work, generation=False)
