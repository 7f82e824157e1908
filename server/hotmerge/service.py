"""The gRPC servicer: protobuf messages in, generation types to the engine, protobuf out.

``generation_request`` is the one place a GenerateRequest is checked and turned into a
GenerationRequest; what needs the tokenizer (prompt length) and the adapter store (unknown or
incompatible adapters) is checked by ``Engine.submit``, which raises the same error types.

Every RPC runs inside ``_rpc``, which turns a HotmergeError into its status code and message and
any other exception into INTERNAL with only a request id for the client (the traceback goes to
the log). A deadline or a client cancel ends the RPC; a callback then cancels the engine's work.
"""

from __future__ import annotations

import functools
import logging
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict

import grpc
import numpy as np
from hotmerge_kernels.params import Strategy

from hotmerge import __version__
from hotmerge.adapter_files import short
from hotmerge.adapters import AdapterInfo
from hotmerge.errors import (
    Cancelled,
    DeadlineExceeded,
    HotmergeError,
    InvalidArgument,
    Unavailable,
)
from hotmerge.generation import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    TokenEvent,
)
from hotmerge.merge_spec import MergeSpec, parse_merge_spec
from hotmerge.merging import MergeOutcome, Merger
from hotmerge.metrics import Metrics
from hotmerge.scheduler import Engine, validate_params
from hotmerge.v1 import hotmerge_pb2 as pb
from hotmerge.v1 import hotmerge_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
# Response metadata of a merge-spec request: the affinity key (the same a client sends as
# x-merge-key request metadata for a balancer to hash on) and the merge cache's key.
MERGE_KEY_HEADER = "x-merge-key"
MERGE_CACHE_KEY_HEADER = "x-merge-cache-key"
MAX_STOP_SEQUENCES = 16
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
    """Check ``msg`` and build the engine's request; raises InvalidArgument.

    Unset fields take their defaults. As in LoRAX, a sampling knob implies sampling: a
    temperature other than 0 (unset) and 1, top_p < 1 or top_k > 0 turn do_sample on.
    A merge spec (``merged_adapters``) is not part of the result: the service resolves it.
    """
    adapter_id = None
    if msg.WhichOneof("adapter") == "adapter_id":
        if not msg.adapter_id:
            raise InvalidArgument(
                "adapter_id is empty: name an adapter, or leave adapter_id unset for the base model"
            )
        adapter_id = msg.adapter_id
    if not msg.inputs:
        raise InvalidArgument("inputs is empty: give the prompt text")

    p = msg.parameters
    max_new_tokens = default_max_new_tokens
    if p.HasField("max_new_tokens"):
        if p.max_new_tokens == 0:
            raise InvalidArgument(
                "parameters.max_new_tokens must be >= 1, got 0 (leave it unset for the server "
                f"default of {default_max_new_tokens})"
            )
        max_new_tokens = p.max_new_tokens
    temperature = _wire_float(p.temperature) or 1.0  # proto3: 0 is unset
    top_p = _wire_float(p.top_p) if p.HasField("top_p") else 1.0
    repetition_penalty = (
        _wire_float(p.repetition_penalty) if p.HasField("repetition_penalty") else 1.0
    )
    if len(p.stop) > MAX_STOP_SEQUENCES:
        raise InvalidArgument(
            f"parameters.stop has {len(p.stop)} sequences; give at most {MAX_STOP_SEQUENCES}"
        )
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=p.top_k,
        do_sample=p.do_sample or temperature != 1.0 or top_p < 1.0 or p.top_k > 0,
        seed=p.seed if p.HasField("seed") else None,
        repetition_penalty=repetition_penalty,
        stop=tuple(p.stop),
        details=p.details,
    )
    validate_params(params)  # the engine's rules, so the messages are the same everywhere
    return GenerationRequest(inputs=msg.inputs, params=params, adapter_id=adapter_id)


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


@functools.lru_cache(maxsize=4096)
def parse_spec_cached(serialized: bytes, max_adapters: int) -> MergeSpec:
    """``parse_merge_spec`` memoised on the message's bytes: repeated specs skip validation."""
    msg = pb.MergedAdapters.FromString(serialized)
    return parse_merge_spec(msg, max_adapters=max_adapters)


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
    )


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
            return str(value)[:64]
    return secrets.token_hex(6)


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


def _log_done(
    request_id: str,
    method: str,
    request: GenerationRequest,
    result: GenerationResult,
    merge: MergeOutcome | None,
) -> None:
    t = result.timings
    if merge is not None:
        adapter = f"{merge.merge_key}({'hit' if merge.cache_hit else 'miss'})"
    else:
        adapter = request.adapter_id or "-"
    log.info(
        "request %s %s adapter=%s tokens=%d finish=%s queue=%.1fms load=%.1fms merge=%.2fms "
        "prefill=%.1fms decode=%.1fms total=%.1fms",
        request_id,
        method,
        adapter,
        result.generated_tokens,
        result.finish_reason.value,
        t.queue_ms,
        t.adapter_load_ms,
        t.merge_ms,
        t.prefill_ms,
        t.decode_ms,
        t.total_ms,
    )


class HotmergeService(pb_grpc.HotmergeServicer):
    """Serves one engine. Until ``attach`` (the model is loading) every RPC is UNAVAILABLE."""

    def __init__(
        self,
        *,
        default_max_new_tokens: int = 64,
        max_merge_adapters: int = 16,
        metrics: Metrics | None = None,
    ) -> None:
        self.default_max_new_tokens = default_max_new_tokens
        self.max_merge_adapters = max_merge_adapters
        self.metrics = metrics or Metrics()
        self.engine: Engine | None = None
        self.merger: Merger | None = None

    def attach(self, engine: Engine, merger: Merger) -> None:
        self.merger = merger
        self.engine = engine

    def _engine(self) -> Engine:
        if self.engine is None or self.merger is None:
            raise Unavailable("the model is still loading; retry when health reports SERVING")
        return self.engine

    def _rpc(self, context: grpc.ServicerContext, method: str, request_id: str):
        return _rpc(context, method, request_id, self.metrics)

    def _merge(self, msg: pb.MergedAdapters, context: grpc.ServicerContext):
        """Resolve a merge spec to a pinned merged adapter; waits and the merge end with the
        RPC's deadline or its client."""
        self._engine()
        spec = parse_spec_cached(msg.SerializeToString(deterministic=True), self.max_merge_adapters)
        return self.merger.acquire(
            spec, deadline=_deadline(context), cancelled=lambda: not context.is_active()
        )

    def _submit(self, msg: pb.GenerateRequest, context: grpc.ServicerContext):
        request = generation_request(msg, default_max_new_tokens=self.default_max_new_tokens)
        engine = self._engine()
        lease = outcome = None
        if msg.WhichOneof("adapter") == "merged_adapters":
            lease, outcome = self._merge(msg.merged_adapters, context)
        handle = engine.submit(request, deadline=_deadline(context), adapter=lease)
        # Runs when the RPC ends for any reason: on a cancel or deadline it stops the work.
        if not context.add_callback(handle.cancel):
            handle.cancel()  # the RPC had already ended
        return request, handle, outcome

    def _done(self, request_id, method, request, result, outcome) -> None:
        self.metrics.generated_tokens.inc(result.generated_tokens)
        _log_done(request_id, method, request, result, outcome)

    def Generate(self, request, context):
        request_id = _request_id(context)
        with self._rpc(context, "Generate", request_id):
            gen_request, handle, outcome = self._submit(request, context)
            result = handle.wait()
            self._done(request_id, "Generate", gen_request, result, outcome)
            _send_merge_keys(context, outcome)
            return generate_response(result, details=gen_request.params.details, merge=outcome)

    def GenerateStream(self, request, context):
        request_id = _request_id(context)
        with self._rpc(context, "GenerateStream", request_id):
            gen_request, handle, outcome = self._submit(request, context)
            keys_sent = False
            for event in handle:
                if not keys_sent:
                    _send_merge_keys(context, outcome)
                    keys_sent = True
                yield pb.GenerateStreamResponse(token=token_message(event), text=event.text)
            self._done(request_id, "GenerateStream", gen_request, handle.result, outcome)
            if not keys_sent:
                _send_merge_keys(context, outcome)
            yield final_stream_message(handle.result, merge=outcome)

    def Merge(self, request, context):
        request_id = _request_id(context)
        with self._rpc(context, "Merge", request_id):
            if not request.HasField("merged_adapters"):
                raise InvalidArgument("merged_adapters is unset: give the merge spec to warm")
            lease, outcome = self._merge(request.merged_adapters, context)
            lease.release()
            _send_merge_keys(context, outcome)
            log.info(
                "request %s Merge %s: hit=%s merge=%.2fms load=%.1fms",
                request_id,
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
            )

    def Info(self, request, context):
        with self._rpc(context, "Info", _request_id(context)):
            engine = self._engine()
            runner, store = engine.runner, engine.store
            hub = "hub ids allowed" if store.allow_hub else "local only"
            return pb.InfoResponse(
                model_id=runner.model_id,
                dtype=str(runner.dtype).removeprefix("torch."),
                device=str(runner.device),
                max_input_tokens=engine.max_input_tokens,
                max_total_tokens=engine.max_total_tokens,
                max_batch_size=engine.max_batch_size,
                default_max_new_tokens=self.default_max_new_tokens,
                max_merge_adapters=self.max_merge_adapters,
                merge_strategies=[s.value for s in Strategy],
                version=__version__,
                adapter_source=f"{store.root} ({hub})",
            )

    def ListAdapters(self, request, context):
        with self._rpc(context, "ListAdapters", _request_id(context)):
            adapters = self._engine().store.list()
            return pb.ListAdaptersResponse(adapters=[adapter_message(a) for a in adapters])

    def LoadAdapter(self, request, context):
        request_id = _request_id(context)
        with self._rpc(context, "LoadAdapter", request_id):
            if not request.adapter_id:
                raise InvalidArgument("adapter_id is empty: name the adapter to load")
            info, load_ms = self._engine().store.load(
                request.adapter_id, deadline=_deadline(context)
            )
            log.info("request %s LoadAdapter %s: %.1f ms", request_id, short(info.id), load_ms)
            return pb.LoadAdapterResponse(adapter=adapter_message(info), load_ms=load_ms)

    def UnloadAdapter(self, request, context):
        request_id = _request_id(context)
        with self._rpc(context, "UnloadAdapter", request_id):
            if not request.adapter_id:
                raise InvalidArgument("adapter_id is empty: name the adapter to unload")
            unloaded = self._engine().store.unload(request.adapter_id)
            adapter = short(request.adapter_id)
            log.info("request %s UnloadAdapter %s: %s", request_id, adapter, unloaded)
            return pb.UnloadAdapterResponse(unloaded=unloaded)
