"""Protobuf messages to the generation types and back, for the gRPC servicer (``grpc_service``).

``generation_request`` turns a GenerateRequest into the engine's GenerationRequest (proto3's
unset values become None for ``api.core.sampling_params``, which applies the defaults); the
rest turn results, merge outcomes, adapters and merge-cache entries into their messages.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from hotmerge.adapters.store import AdapterInfo
from hotmerge.api import core
from hotmerge.generation import FinishReason, GenerationRequest, GenerationResult, TokenEvent
from hotmerge.merging.cache import MergeEntry
from hotmerge.merging.merger import MergeOutcome
from hotmerge.merging.named import NamedMerge
from hotmerge.v1 import hotmerge_pb2 as pb

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
