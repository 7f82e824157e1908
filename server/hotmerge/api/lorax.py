"""LoRAX's REST wire format: request models, and the translation to and from the request path.

Field names are LoRAX's (``inputs``, ``parameters.{adapter_id, merged_adapters, ...}``;
``generated_text``, ``details.{finish_reason, prompt_tokens, generated_tokens, seed, prefill,
tokens}``), so ``lorax-client`` and hand-written LoRAX calls work unchanged. hotmerge's own
additions (merge keys, cache hit, timings) go under a ``hotmerge`` key that LoRAX clients
ignore. Errors are ``{"error": ..., "error_type": ...}``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from pydantic import BaseModel, ConfigDict

from hotmerge.api.core import RequestPath, Submission, finite_or_none, generation_request
from hotmerge.errors import InvalidArgument
from hotmerge.generation import FinishReason, GenerationRequest, GenerationResult, TokenEvent
from hotmerge.merging.spec import merged_adapters_from_dict
from hotmerge.request_rules import Wire
from hotmerge.v1 import hotmerge_pb2 as pb

FINISH_REASONS = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS: "eos_token",
    FinishReason.STOP_SEQUENCE: "stop_sequence",
}


# LoRAX's field names, for the rule book's messages; LoRAX generates at least one token.
WIRE = Wire(
    {"adapter_id": "parameters.adapter_id", "prompt_logprobs": "parameters.decoder_input_details"},
    scores_prompt=False,
)


class Parameters(BaseModel):
    """LoRAX's ``parameters``; fields LoRAX clients always send but hotmerge does not implement
    are accepted at their neutral values and refused otherwise (``unsupported``). Any other
    field is refused (422), and types are strict: ``"4"`` is not a number, 4.0 not an int."""

    model_config = ConfigDict(extra="forbid", strict=True)

    adapter_id: str | None = None
    adapter_source: str | None = None  # hotmerge loads from its adapter root (or hub if allowed)
    api_token: str | None = None  # ignored
    merged_adapters: dict[str, Any] | None = None
    do_sample: bool = False
    max_new_tokens: int | None = None
    ignore_eos_token: bool = False
    repetition_penalty: float | None = None
    return_full_text: bool = False
    stop: list[str] = []
    seed: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = None
    best_of: int | None = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    return_k_alternatives: int | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> str | None:
        """The first field set to something hotmerge cannot do, as an error message."""
        checks = {
            "ignore_eos_token": self.ignore_eos_token,
            "truncate": self.truncate is not None,
            "typical_p": self.typical_p is not None,
            "best_of": self.best_of not in (None, 1),
            "watermark": self.watermark,
            "return_k_alternatives": self.return_k_alternatives is not None,
            "response_format": self.response_format is not None,
        }
        for name, bad in checks.items():
            if bad:
                return f"parameters.{name} is not supported by hotmerge; leave it unset"
        return None


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    inputs: str
    parameters: Parameters = Parameters()
    stream: bool = False


def to_request(
    body: GenerateRequest, path: RequestPath
) -> tuple[GenerationRequest, pb.MergedAdapters | None]:
    """The engine's request and the inline merge spec (None without one)."""
    p = body.parameters
    problem = p.unsupported()
    if problem:
        raise InvalidArgument(problem)
    params = path.params(
        max_new_tokens=p.max_new_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        do_sample=p.do_sample,
        seed=p.seed,
        repetition_penalty=p.repetition_penalty,
        stop=p.stop,
        details=p.details,
        prompt_logprobs=p.decoder_input_details,
    )
    merged = None
    if p.merged_adapters is not None:
        merged = merged_adapters_from_dict(p.merged_adapters, where="parameters.merged_adapters")
    request = generation_request(params, inputs=body.inputs, adapter_id=p.adapter_id)
    return request, merged


def token(event: TokenEvent, *, special: bool = False) -> dict[str, Any]:
    return {"id": event.token_id, "text": event.text, "logprob": event.logprob, "special": special}


def prefill_token(event: TokenEvent) -> dict[str, Any]:
    return {"id": event.token_id, "text": event.text, "logprob": finite_or_none(event.logprob)}


def hotmerge_extras(sub: Submission, result: GenerationResult) -> dict[str, Any]:
    extras: dict[str, Any] = {"timings": asdict(result.timings)}
    if sub.merge is not None:
        extras.update(
            merge_key=sub.merge.merge_key,
            affinity_key=sub.merge.affinity_key,
            cache_hit=sub.merge.cache_hit,
        )
    return extras


def _seed(sub: Submission) -> int | None:
    """The sampling seed (None when greedy), as LoRAX reports it."""
    p = sub.request.params
    return p.seed if p.do_sample and p.temperature != 0 else None


def response(sub: Submission, result: GenerationResult, *, full_text: bool) -> dict[str, Any]:
    text = result.generated_text
    if full_text and sub.request.inputs is not None:
        text = sub.request.inputs + text
    details = None
    if sub.request.params.details:
        details = {
            "finish_reason": FINISH_REASONS[result.finish_reason],
            "prompt_tokens": result.prompt_tokens,
            "generated_tokens": result.generated_tokens,
            "seed": _seed(sub),
            "prefill": [prefill_token(t) for t in result.prompt],
            "tokens": [token(t) for t in result.tokens],
        }
    return {"generated_text": text, "details": details, "hotmerge": hotmerge_extras(sub, result)}


def stream_token(event: TokenEvent) -> dict[str, Any]:
    return {"token": token(event), "generated_text": None, "details": None}


def stream_final(sub: Submission, last: TokenEvent, result: GenerationResult) -> dict[str, Any]:
    """The last event: the last token, the whole text and the details (as LoRAX sends it)."""
    details = {
        "finish_reason": FINISH_REASONS[result.finish_reason],
        "prompt_tokens": result.prompt_tokens,
        "generated_tokens": result.generated_tokens,
        "seed": _seed(sub),
    }
    return {
        "token": token(last),
        "generated_text": result.generated_text,
        "details": details,
        "hotmerge": hotmerge_extras(sub, result),
    }


ERROR_TYPES = {400: "validation", 422: "validation", 404: "not_found", 429: "overloaded"}


def error_body(status: int, message: str) -> dict[str, str]:
    return {"error": message, "error_type": ERROR_TYPES.get(status, "generation")}
