"""The gRPC servicer: protobuf messages in, the request path's calls, protobuf out.

``generation_request`` turns a GenerateRequest into the engine's GenerationRequest (proto3's
unset values become None for ``api.core.sampling_params``, which applies the defaults);
``RequestPath`` (``api/core.py``), which the HTTP fronts call too, checks it with the rule book
(``request_rules``), resolves the adapter, named merge or merge spec and submits to the engine.

Every RPC runs inside ``_rpc``, which turns a HotmergeError into its status code and message and
any other exception into INTERNAL with only a request id for the client (the traceback goes to
the log). A deadline or a client cancel ends the RPC; a callback then cancels the engine's work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict

import grpc
import numpy as np
from hotmerge_kernels.merge.params import Strategy

from hotmerge import __version__
from hotmerge.adapters.files import short
from hotmerge.adapters.store import AdapterInfo, AdapterStore
from hotmerge.api import core
from hotmerge.api.core import RequestPath, Submission
from hotmerge.engine import Engine
from hotmerge.errors import Cancelled, DeadlineExceeded, HotmergeError, InvalidArgument
from hotmerge.generation import FinishReason, GenerationRequest, GenerationResult, TokenEvent
from hotmerge.headers import MERGE_CACHE_KEY_HEADER, MERGE_KEY_HEADER, REQUEST_ID_HEADER
from hotmerge.merging.cache import MergeEntry
from hotmerge.merging.merger import MergeOutcome, Merger
from hotmerge.merging.named import NamedMerge, NamedMerges
from hotmerge.metrics import Metrics
from hotmerge.v1 import hotmerge_pb2 as pb
from hotmerge.v1 import hotmerge_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# gRPC reports "no deadline" as a deadline far in the future.
_NO_DEADLINE_S = 1e7

_FINISH_REASONS = {
    FinishReason.LENGTH: pb.LENGTH,
    FinishReason.EOS: pb.EOS,
    FinishReason.STOP_SEQUENCE: pb.STOP_SEQUENCE,
}


# -- proto -> generation types ------------------------------------------------------------------


def _wire_float(x: float) -> float:
    """A float32 from the wire as the decimal the client wrote (0.9, not 0.8999999761...)."""
    return float(str(np.float32(x)))


def generation_request(
    msg: pb.GenerateRequest, *, default_max_new_tokens: int
) -> GenerationRequest:
    """The engine's request for ``msg``; the request path checks it (``request_rules``).

    Unset fields take their defaults (``api.core.sampling_params``). A merge spec
    (``merged_adapters``) is not part of the result: the request path resolves it.
    """
    p = msg.parameters
    params = core.sampling_params(
        default_max_new_tokens=default_max_new_tokens,
        max_new_tokens=p.max_new_tokens if p.HasField("max_new_tokens") else None,
        temperature=_wire_float(p.temperature) or None,  # proto3: 0 is unset
        top_p=_wire_float(p.top_p) if p.HasField("top_p") else None,
        top_k=p.top_k,
        do_sample=p.do_sample,
        seed=p.seed if p.HasField("seed") else None,
        repetition_penalty=(
            _wire_float(p.repetition_penalty) if p.HasField("repetition_penalty") else None
        ),
        stop=tuple(p.stop),
        details=p.details,
        prompt_logprobs=p.prompt_logprobs,
    )
    adapter_id = msg.adapter_id if msg.WhichOneof("adapter") == "adapter_id" else None
    return core.generation_request(
        params, inputs=msg.inputs, input_ids=list(msg.input_ids), adapter_id=adapter_id
    )


def _send_merge_keys(context: grpc.ServicerContext, outcome: MergeOutcome | None) -> None:
    """The merge keys as initial metadata, sent with the first response message and not
    before: a replica that dies before answering has then sent nothing, so a balancer can
    still replay the request on another replica."""
    if outcome is None:
        return
    if not context.is_active():  # the deadline passed or the client left (e.g. mid-merge)
        raise Cancelled("the RPC ended before its response")
    context.send_initial_metadata(
        ((MERGE_KEY_HEADER, outcome.affinity_key), (MERGE_CACHE_KEY_HEADER, outcome.merge_key))
    )


# -- generation types -> proto ------------------------------------------------------------------


def token_message(event: TokenEvent) -> pb.Token:
    return pb.Token(id=event.token_id, text=event.text, logprob=event.logprob)


def merge_info(outcome: MergeOutcome | None) -> pb.MergeInfo | None:
    if outcome is None:
        return None
    return pb.MergeInfo(
        merge_key=outcome.merge_key,
        cache_hit=outcome.cache_hit,
        affinity_key=outcome.affinity_key,
    )


def generate_response(
    result: GenerationResult, *, details: bool, merge: MergeOutcome | None
) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        generated_text=result.generated_text,
        finish_reason=_FINISH_REASONS[result.finish_reason],
        generated_tokens=result.generated_tokens,
        tokens=[token_message(t) for t in result.tokens] if details else [],
        timings=pb.Timings(**asdict(result.timings)),
        merge=merge_info(merge),
        prompt_tokens=result.prompt_tokens,
        prompt=[token_message(t) for t in result.prompt],
    )


def final_stream_message(
    result: GenerationResult, *, merge: MergeOutcome | None
) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(
        done=True,
        generated_text=result.generated_text,
        finish_reason=_FINISH_REASONS[result.finish_reason],
        generated_tokens=result.generated_tokens,
        timings=pb.Timings(**asdict(result.timings)),
        merge=merge_info(merge),
        prompt_tokens=result.prompt_tokens,
        prompt=[token_message(t) for t in result.prompt],
    )


def named_merge_message(merge: NamedMerge) -> pb.AdapterInfo:
    return pb.AdapterInfo(id=merge.name, named_merge=merge.message)


def adapter_message(info: AdapterInfo) -> pb.AdapterInfo:
    return pb.AdapterInfo(
        id=info.id,
        rank=info.rank,
        alpha=info.alpha,
        use_rslora=info.use_rslora,
        target_modules=list(info.target_modules),
        bytes=info.nbytes,
        loaded=info.loaded,
        revision=info.revision,
    )


# -- the servicer -------------------------------------------------------------------------------


def _request_id(context: grpc.ServicerContext) -> str:
    """The caller's x-request-id (e.g. from a load balancer), else a fresh one."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and value:
            return core.request_id_or_new(str(value))
    return core.new_request_id()


def _deadline(context: grpc.ServicerContext) -> float | None:
    """The RPC's deadline on the time.monotonic() clock the engine uses; None if it has none."""
    remaining = context.time_remaining()
    if remaining is None or remaining > _NO_DEADLINE_S:
        return None
    return time.monotonic() + remaining


def _deadline_passed(context: grpc.ServicerContext) -> bool:
    # A little slack: the engine's clock (monotonic) and gRPC's (wall) may disagree slightly.
    remaining = context.time_remaining()
    return remaining is not None and remaining < 0.05


@contextmanager
def _rpc(
    context: grpc.ServicerContext, method: str, request_id: str, metrics: Metrics
) -> Iterator[None]:
    """Turn what the block raises into the RPC's status (never a traceback); count it."""
    context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
    started = time.perf_counter()
    try:
        yield
        metrics.observe_request(method, grpc.StatusCode.OK, time.perf_counter() - started)
        return
    except GeneratorExit:  # a stream whose client went away (or whose deadline passed)
        code = _ended_code(context)
        log.info("request %s %s: %s (stream closed)", request_id, method, code.name)
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
        if not context.is_active():  # grpc refused to act on an RPC that had already ended
            code, message = _ended_code(context), "the RPC ended"
            log.info("request %s %s: %s (%s)", request_id, method, code.name, exc)
        else:
            log.exception("request %s %s failed", request_id, method)
            code = grpc.StatusCode.INTERNAL
            message = f"internal error (request id {request_id}); the server log has details"
    metrics.observe_request(method, code, time.perf_counter() - started)
    context.abort(code, message)


DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED


def _ended_code(context: grpc.ServicerContext) -> grpc.StatusCode:
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

    def _rpc(self, context: grpc.ServicerContext, method: str, request_id: str):
        return _rpc(context, method, request_id, self.metrics)

    def _submit(self, msg: pb.GenerateRequest, context: grpc.ServicerContext) -> Submission:
        request = generation_request(msg, default_max_new_tokens=self.path.default_max_new_tokens)
        merged = msg.merged_adapters if msg.WhichOneof("adapter") == "merged_adapters" else None
        sub = self.path.submit(
            request,
            merged_adapters=merged,
            deadline=_deadline(context),
            cancelled=lambda: not context.is_active(),
        )
        # Runs when the RPC ends for any reason: on a cancel or deadline it stops the work.
        if not context.add_callback(sub.handle.cancel):
            sub.handle.cancel()  # the RPC had already ended
        return sub

    def Generate(self, request, context):
        request_id = _request_id(context)
        with self._rpc(context, "Generate", request_id):
            sub = self._submit(request, context)
            result = sub.handle.wait()
            self.path.finished(request_id, "Generate", sub)
            _send_merge_keys(context, sub.merge)
            return generate_response(result, details=sub.request.params.details, merge=sub.merge)

    def GenerateStream(self, request, context):
        request_id = _request_id(context)
        with self._rpc(context, "GenerateStream", request_id):
            sub = self._submit(request, context)
            keys_sent = False
            for event in sub.handle:
                if not keys_sent:
                    _send_merge_keys(context, sub.merge)
                    keys_sent = True
                yield pb.GenerateStreamResponse(token=token_message(event), text=event.text)
            self.path.finished(request_id, "GenerateStream", sub)
            if not keys_sent:
                _send_merge_keys(context, sub.merge)
            yield final_stream_message(sub.handle.result, merge=sub.merge)

    def Merge(self, request, context):
        request_id = _request_id(context)
        with self._rpc(context, "Merge", request_id):
            if not request.HasField("merged_adapters"):
                raise InvalidArgument("merged_adapters is unset: give the merge spec to warm")
            outcome, _ = self.path.merge(
                request.merged_adapters,
                request.name,
                replace=request.replace,
                deadline=_deadline(context),
                cancelled=lambda: not context.is_active(),
            )
            _send_merge_keys(context, outcome)
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

    def Info(self, request, context):
        with self._rpc(context, "Info", _request_id(context)):
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

    def ListAdapters(self, request, context):
        with self._rpc(context, "ListAdapters", _request_id(context)):
            adapters = [adapter_message(a) for a in self.path.ready_store().list()]
            adapters += [named_merge_message(m) for m in self.path.named.list()]
            return pb.ListAdaptersResponse(adapters=adapters)

    def ListMerges(self, request, context):
        with self._rpc(context, "ListMerges", _request_id(context)):
            self.path.ready_engine()
            cache = self.path.merger.cache
            stats = cache.stats()
            return pb.ListMergesResponse(
                merges=[merge_entry_message(e, pins) for e, pins in cache.entries()],
                used_bytes=stats.used_bytes,
                budget_bytes=stats.budget_bytes,
            )

    def LoadAdapter(self, request, context):
        request_id = _request_id(context)
        with self._rpc(context, "LoadAdapter", request_id):
            if not request.adapter_id:
                raise InvalidArgument("adapter_id is empty: name the adapter to load")
            info, load_ms = self.path.ready_store().load(
                request.adapter_id, deadline=_deadline(context)
            )
            log.info("request %s LoadAdapter %s: %.1f ms", request_id, short(info.id), load_ms)
            return pb.LoadAdapterResponse(adapter=adapter_message(info), load_ms=load_ms)

    def UnloadAdapter(self, request, context):
        request_id = _request_id(context)
        with self._rpc(context, "UnloadAdapter", request_id):
            if not request.adapter_id:
                raise InvalidArgument("adapter_id is empty: name the adapter to unload")
            unloaded = self.path.ready_store().unload(request.adapter_id)
            adapter = short(request.adapter_id)
            log.info("request %s UnloadAdapter %s: %s", request_id, adapter, unloaded)
            return pb.UnloadAdapterResponse(unloaded=unloaded)


def merge_entry_message(entry: MergeEntry, pins: int) -> pb.MergeEntryInfo:
    """A merge-cache entry on the wire; ``entry.spec`` is the (MergeSpec, affinity key) the
    Merger stored with it."""
    msg = pb.MergeEntryInfo(
        merge_key=entry.key,
        rank=entry.adapter.rank,
        bytes=entry.nbytes,
        hits=entry.hits,
        last_used_unix_s=entry.last_used,
        in_use=pins > 0,
        merge_ms=entry.merge_ms,
    )
    if entry.spec is not None:
        spec, affinity = entry.spec
        msg.affinity_key = affinity
        msg.spec.CopyFrom(spec.to_message())
    return msg
