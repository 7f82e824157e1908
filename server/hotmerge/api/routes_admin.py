"""Named merges and the operator's routes: ``POST /merges``, ``GET /merges`` (register and list
named merges), ``GET /metrics`` (Prometheus), ``/healthz`` (liveness), ``/readyz`` (readiness)."""

from __future__ import annotations

import functools
import logging
from typing import Any

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from hotmerge.api.http_common import (
    LORAX,
    HttpContext,
    body_schema,
    merge_headers,
    parse_body,
    spec_json,
)
from hotmerge.api.http_guard import ClientWatch, request_deadline
from hotmerge.merging.spec import merged_adapters_from_dict

log = logging.getLogger(__name__)


class MergeBody(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)

    name: str = ""
    merged_adapters: dict[str, Any]
    replace: bool = False  # replace the spec of a name already registered


def add_admin_routes(app: FastAPI, ctx: HttpContext) -> None:
    path, lifecycle = ctx.path, ctx.lifecycle

    @app.post("/merges", openapi_extra=body_schema(MergeBody))
    async def register_merge(request: Request):
        async def work(request_id, done):
            body = await parse_body(request, MergeBody, LORAX)
            msg = merged_adapters_from_dict(body.merged_adapters)
            deadline, watch = request_deadline(request), ClientWatch(request)
            watch.start()
            try:
                outcome, _ = await run_in_threadpool(
                    functools.partial(
                        path.merge,
                        msg,
                        body.name,
                        replace=body.replace,
                        deadline=deadline,
                        cancelled=watch.gone.is_set,
                    )
                )
            finally:
                watch.stop()
            log.info(
                "request %s POST /merges name=%s key=%s", request_id, body.name, outcome.merge_key
            )
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

        return await ctx.call(LORAX, "POST /merges", request, work, generation=False)

    @app.get("/merges")
    async def list_merges(request: Request):
        async def work(request_id, done):
            path.ready_engine()
            merges = {m.name: spec_json(m.message) for m in path.named.list()}
            return JSONResponse({"merges": merges})

        return await ctx.call(LORAX, "GET /merges", request, work, generation=False)

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
        return Response(ctx.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
