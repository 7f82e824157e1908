"""The gRPC servicer (``grpc.aio``): protobuf messages in, the request path's calls, protobuf out.

Every RPC is a coroutine on the gRPC server's event loop (``api/grpc_server.py``). What may block
(a merge, an adapter load, the store and cache listings) runs on the loop's thread pool; a
stream's tokens come to the loop from the engine thread with no thread of their own
(``api/async_handle.py``). Messages are made in ``api/grpc_messages.py``; ``RequestPath``
(``api/core.py``), which the HTTP fronts call too, checks a request with the rule book
(``request_rules``), resolves the adapter, named merge or merge spec and submits to the engine.

Every RPC runs inside ``_rpc``, which turns a HotmergeError into its status code and message and
any other exception into INTERNAL with only a request id for the client (the traceback goes to
the log). A deadline or a client cancel ends the RPC (its task is cancelled) and the engine's
work with it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import grpc
from hotmerge_kernels.merge.params import Strategy

from hotmerge import __version__
from hotmerge.adapters.files import short
from hotmerge.adapters.store import AdapterStore
from hotmerge.api import core
from hotmerge.api.async_handle import result as handle_result
from hotmerge.api.async_handle import token_events
from hotmerge.api.core import RequestPath, Submission
from hotmerge.api.grpc_messages import (
    adapter_message,
    final_stream_message,
    generate_response,
    generation_request,
    merge_entry_message,
    named_merge_message,
    token_message,
)
from hotmerge.engine import Engine
from hotmerge.errors import Cancelled, DeadlineExceeded, HotmergeError, InvalidArgument
from hotmerge.headers import MERGE_CACHE_KEY_HEADER, MERGE_KEY_HEADER, REQUEST_ID_HEADER
from hotmerge.merging.merger import MergeOutcome, Merger
from hotmerge.merging.named import NamedMerges
from hotmerge.metrics import Metrics
from hotmerge.v1 import hotmerge_pb2 as pb
from hotmerge.v1 import hotmerge_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# gRPC reports "no deadline" as a deadline far in the future.
_NO_DEADLINE_S = 1e7
T = TypeVar("T")


async def _blocking(fn: Callable[[], T]) -> T:
    """``fn()`` on the loop's thread pool (it may wait: a merge, a load, a lock)."""
    return await asyncio.get_running_loop().run_in_executor(None, fn)


class _Ended:
    """Set once the RPC ends (done, cancelled or past its deadline): read from any thread (a
    merge polls it); ``on_end`` callbacks (cancelling the engine's work) run then."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._event = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        context.add_done_callback(lambda _: self._end())

    def is_set(self) -> bool:
        return self._event.is_set()

    def _end(self) -> None:
        with self._lock:
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def on_end(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when the RPC ends; at once if it has."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        callback()


async def _send_merge_keys(context: grpc.aio.ServicerContext, outcome: MergeOutcome | None) -> None:
    """The merge keys as initial metadata, sent with the first response message and not
    before: a replica that dies before answering has then sent nothing, so a balancer can
    still replay the request on another replica."""
    if outcome is None:
        return
    if context.done():  # the deadline passed or the client left (e.g. mid-merge)
        raise Cancelled("the RPC ended before its response")
    await context.send_initial_metadata(
        ((MERGE_KEY_HEADER, outcome.affinity_key), (MERGE_CACHE_KEY_HEADER, outcome.merge_key))
    )


# -- the servicer -------------------------------------------------------------------------------


def _request_id(context: grpc.aio.ServicerContext) -> str:
    """The caller's x-request-id (e.g. from a load balancer), else a fresh one."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and value:
            return core.request_id_or_new(str(value))
    return core.new_request_id()


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The RPC's deadline on the time.monotonic() clock the engine uses; None if it has none."""
    remaining = context.time_remaining()
    if remaining is None or remaining > _NO_DEADLINE_S:
        return None
    return time.monotonic() + remaining


def _deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    # A little slack: the engine's clock (monotonic) and gRPC's (wall) may disagree slightly.
    remaining = context.time_remaining()
    return remaining is not None and remaining < 0.05


@asynccontextmanager
async def _rpc(
    context: grpc.aio.ServicerContext, method: str, request_id: str, metrics: Metrics
) -> AsyncIterator[None]:
    """Turn what the block raises into the RPC's status (never a traceback); count it."""
    context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
    started = time.perf_counter()
    try:
        yield
        metrics.observe_request(method, grpc.StatusCode.OK, time.perf_counter() - started)
        return
    except (asyncio.CancelledError, GeneratorExit):  # the client went away, or the deadline
        code = _ended_code(context)
        log.info("request %s %s: %s (RPC ended)", request_id, method, code.name)
        metrics.observe_request(method, code, time.perf_counter() - started)
        raise
    except (Cancelled, DeadlineExceeded) as err:
        code = _ended_code(context) if isinstance(err, Cancelled) else err.code
        message = "deadline exceeded; stopped" if code is DEADLINE else str(err)
        log.info("request %s %s: %s: %s", request_id, method, code.name, err)
    except HotmergeError as err:
        code, message = err.code, str(err)
        if code == grpc.StatusCode.INTERNAL:  # a failure inside the engine: details stay here
            log.error("request %s %s failed: %s", request_id, method, err, exc_info=err)
            message = f"internal error (request id {request_id}); the server log has details"
        else:
            log.info("request %s %s: %s: %s", request_id, method, code.name, message)
    except Exception as exc:
        if context.done():  # grpc refused to act on an RPC that had already ended
            code, message = _ended_code(context), "the RPC ended"
            log.info("request %s %s: %s (%s)", request_id, method, code.name, exc)
        else:
            log.exception("request %s %s failed", request_id, method)
            code = grpc.StatusCode.INTERNAL
            message = f"internal error (request id {request_id}); the server log has details"
    metrics.observe_request(method, code, time.perf_counter() - started)
    await context.abort(code, message)


DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED


def _ended_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """Why an RPC ended early: its deadline passed, or else its client cancelled it."""
    return DEADLINE if _deadline_passed(context) else grpc.StatusCode.CANCELLED


class HotmergeService(pb_grpc.HotmergeServicer):
    """Serves one engine. Until ``attach`` (the model is loading) every RPC is UNAVAILABLE."""

    def __init__(
        self,
        *,
        default_max_new_tokens: int = 64,
        max_merge_adapters: int = 16,
        metrics: Metrics | None = None,
        path: RequestPath | None = None,
    ) -> None:
        self.path = path or RequestPath(
            default_max_new_tokens=default_max_new_tokens,
            max_merge_adapters=max_merge_adapters,
            metrics=metrics,
        )
        self.metrics = self.path.metrics

    @property
    def engine(self) -> Engine | None:
        return self.path.engine

    @property
    def merger(self) -> Merger | None:
        return self.path.merger

    def attach(
        self, engine: Engine, store: AdapterStore, merger: Merger, named: NamedMerges
    ) -> None:
        self.path.attach(engine, store, merger, named)

    def _rpc(self, context: grpc.aio.ServicerContext, method: str, request_id: str):
        return _rpc(context, method, request_id, self.metrics)

    async def _submit(
        self, msg: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> Submission:
        """Check, resolve (a merge may take a while: on the thread pool) and submit; the
        engine's work stops when the RPC ends for any reason (a cancel, the deadline)."""
        request = generation_request(msg, default_max_new_tokens=self.path.default_max_new_tokens)
        merged = msg.merged_adapters if msg.WhichOneof("adapter") == "merged_adapters" else None
        deadline, ended = _deadline(context), _Ended(context)

        def submit() -> Submission:
            sub = self.path.submit(
                request, merged_adapters=merged, deadline=deadline, cancelled=ended.is_set
            )
            ended.on_end(sub.handle.cancel)  # also if this RPC's task was cancelled meanwhile
            return sub

        return await _blocking(submit)

    async def Generate(self, request, context):
        request_id = _request_id(context)
        async with self._rpc(context, "Generate", request_id):
            sub = await self._submit(request, context)
            result = await handle_result(sub.handle)
            self.path.finished(request_id, "Generate", sub)
            await _send_merge_keys(context, sub.merge)
            return generate_response(result, details=sub.request.params.details, merge=sub.merge)

    async def GenerateStream(self, request, context):
        request_id = _request_id(context)
        async with self._rpc(context, "GenerateStream", request_id):
            sub = await self._submit(request, context)
            keys_sent = False
            async for event in token_events(sub.handle):
                if not keys_sent:
                    await _send_merge_keys(context, sub.merge)
                    keys_sent = True
                yield pb.GenerateStreamResponse(token=token_message(event), text=event.text)
            self.path.finished(request_id, "GenerateStream", sub)
            if not keys_sent:
                await _send_merge_keys(context, sub.merge)
            yield final_stream_message(sub.handle.result, merge=sub.merge)

    async def Merge(self, request, context):
        request_id = _request_id(context)
        async with self._rpc(context, "Merge", request_id):
            if not request.HasField("merged_adapters"):
                raise InvalidArgument("merged_adapters is unset: give the merge spec to warm")
            deadline, ended = _deadline(context), _Ended(context)
            outcome, _ = await _blocking(
                lambda: self.path.merge(
                    request.merged_adapters,
                    request.name,
                    replace=request.replace,
                    deadline=deadline,
                    cancelled=ended.is_set,
                )
            )
            await _send_merge_keys(context, outcome)
            log.info(
                "request %s Merge %skey=%s: hit=%s merge=%.2fms load=%.1fms",
                request_id,
                f"name={request.name} " if request.name else "",
                outcome.merge_key,
                outcome.cache_hit,
                outcome.merge_ms,
                outcome.adapter_load_ms,
            )
            return pb.MergeResponse(
                merge_key=outcome.merge_key,
                affinity_key=outcome.affinity_key,
                rank=outcome.rank,
                bytes=outcome.nbytes,
                cache_hit=outcome.cache_hit,
                merge_ms=outcome.merge_ms,
                adapter_load_ms=outcome.adapter_load_ms,
                name=request.name,
            )

    async def Info(self, request, context):
        async with self._rpc(context, "Info", _request_id(context)):
            engine = self.path.ready_engine()
            runner, store = engine.runner, self.path.ready_store()
            hub = "hub ids allowed" if store.adapter_root.allow_hub else "local only"
            return pb.InfoResponse(
                model_id=runner.model_id,
                dtype=str(runner.dtype).removeprefix("torch."),
                device=str(runner.device),
                max_input_tokens=engine.max_input_tokens,
                max_total_tokens=engine.max_total_tokens,
                max_batch_size=engine.max_batch_size,
                default_max_new_tokens=self.path.default_max_new_tokens,
                max_merge_adapters=self.path.max_merge_adapters,
                merge_strategies=[s.value for s in Strategy],
                version=__version__,
                adapter_source=f"{store.adapter_root.path} ({hub})",
                quantize=runner.config.quantize or "",
            )

    async def ListAdapters(self, request, context):
        async with self._rpc(context, "ListAdapters", _request_id(context)):
            return await _blocking(self._adapters)

    def _adapters(self) -> pb.ListAdaptersResponse:
        adapters = [adapter_message(a) for a in self.path.ready_store().list()]
        adapters += [named_merge_message(m) for m in self.path.named.list()]
        return pb.ListAdaptersResponse(adapters=adapters)

    async def ListMerges(self, request, context):
        async with self._rpc(context, "ListMerges", _request_id(context)):
            return await _blocking(self._merges)

    def _merges(self) -> pb.ListMergesResponse:
        self.path.ready_engine()
        cache = self.path.merger.cache
        stats = cache.stats()
        return pb.ListMergesResponse(
            merges=[merge_entry_message(e, pins) for e, pins in cache.entries()],
            used_bytes=stats.used_bytes,
            budget_bytes=stats.budget_bytes,
        )

    async def LoadAdapter(self, request, context):
        request_id = _request_id(context)
        async with self._rpc(context, "LoadAdapter", request_id):
            if not request.adapter_id:
                raise InvalidArgument("adapter_id is empty: name the adapter to load")
            deadline = _deadline(context)
            info, load_ms = await _blocking(
                lambda: self.path.ready_store().load(request.adapter_id, deadline=deadline)
            )
            log.info("request %s LoadAdapter %s: %.1f ms", request_id, short(info.id), load_ms)
            return pb.LoadAdapterResponse(adapter=adapter_message(info), load_ms=load_ms)

    async def UnloadAdapter(self, request, context):
        request_id = _request_id(context)
        async with self._rpc(context, "UnloadAdapter", request_id):
            if not request.adapter_id:
                raise InvalidArgument("adapter_id is empty: name the adapter to unload")
            unloaded = await _blocking(lambda: self.path.ready_store().unload(request.adapter_id))
            adapter = short(request.adapter_id)
            log.info("request %s UnloadAdapter %s: %s", request_id, adapter, unloaded)
            return pb.UnloadAdapterResponse(unloaded=unloaded)
