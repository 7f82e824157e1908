"""OpenAI's completions and chat wire format: request models, and the translation to and from
the request path.

``model`` names the base model, an adapter id or a named merge; a ``merged_adapters`` object in
the body (the openai client's ``extra_body``) merges inline. Completions take ``prompt`` as text
or token ids (one prompt or a batch: each runs as its own request, batched by the engine) and
support ``echo`` with ``logprobs`` and ``max_tokens: 0`` (prompt-token logprobs, scored without
generating a token), which is what lm-eval-harness's loglikelihood requests send.
``top_logprobs`` holds only the chosen token (alternatives are not computed). As in OpenAI,
``temperature`` defaults to 1 (sampling); 0 is greedy. Errors are
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from hotmerge.api.core import RequestPath, Submission, finite_or_none, generation_request
from hotmerge.errors import InvalidArgument
from hotmerge.generation import FinishReason, GenerationRequest, GenerationResult, TokenEvent
from hotmerge.merging.spec import merged_adapters_from_dict
from hotmerge.request_rules import Wire
from hotmerge.v1 import hotmerge_pb2 as pb

FINISH_REASONS = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
}


# OpenAI's field names, for the rule book's messages. Completions score a prompt with
# max_tokens 0 and echo; chat always generates.
_NAMES = {
    name: name for name in ("temperature", "top_p", "top_k", "seed", "repetition_penalty", "stop")
} | {"max_new_tokens": "max_tokens", "adapter_id": "model"}
COMPLETIONS_WIRE = Wire(
    _NAMES | {"inputs": "prompt", "input_ids": "prompt", "prompt_logprobs": "echo"}
)
CHAT_WIRE = Wire(_NAMES | {"inputs": "messages", "input_ids": "messages"}, scores_prompt=False)


class _Common(BaseModel):
    """OpenAI's documented fields; those hotmerge does not implement are accepted at their
    neutral values and refused otherwise (``_check``). Unknown fields are refused (400) and
    types are strict."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None  # ignored
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    suffix: str | None = None
    service_tier: str | None = None  # ignored
    # hotmerge (and vLLM) extensions, through the openai client's extra_body:
    merged_adapters: dict[str, Any] | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None  # the newer name of max_tokens
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None  # ignored
    metadata: dict[str, str] | None = None  # ignored


def prompts(body: CompletionRequest) -> list[str | list[int]]:
    """The batch of prompts: one text, several texts, one list of ids, or several."""
    p = body.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise InvalidArgument("prompt is empty: give text or token ids")
    if all(isinstance(x, int) for x in p):
        return [list(p)]
    return list(p)


def _check(body: _Common) -> None:
    if body.n != 1:
        raise InvalidArgument(f"n must be 1, got {body.n}")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise InvalidArgument(f"{name} is not supported; use repetition_penalty")
    unsupported = {
        "logit_bias": bool(body.logit_bias),
        "best_of": body.best_of not in (None, 1),
        "suffix": bool(getattr(body, "suffix", None)),
        "top_logprobs": bool(getattr(body, "top_logprobs", None)),
        "response_format": getattr(body, "response_format", None) not in (None, {"type": "text"}),
        "tools": bool(getattr(body, "tools", None)),
        "tool_choice": getattr(body, "tool_choice", None) not in (None, "none", "auto"),
    }
    for name, bad in unsupported.items():
        if bad:
            raise InvalidArgument(f"{name} is not supported by hotmerge; leave it unset")


def _params(body: _Common, path: RequestPath, *, max_tokens: int | None, details: bool, prompt_lp):
    temperature = 1.0 if body.temperature is None else body.temperature
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return path.params(
        max_new_tokens=max_tokens,
        temperature=temperature if temperature != 0 else None,
        top_p=body.top_p,
        top_k=body.top_k,
        do_sample=temperature != 0,
        seed=body.seed,
        repetition_penalty=body.repetition_penalty,
        stop=stop,
        details=details,
        prompt_logprobs=prompt_lp,
    )


def _adapter(body: _Common, base_names: set[str]) -> tuple[str | None, pb.MergedAdapters | None]:
    """(adapter id or named merge, inline spec) from ``model`` and ``merged_adapters``."""
    if body.merged_adapters is not None:
        if body.model not in base_names:
            raise InvalidArgument(
                f"model {body.model!r}: with merged_adapters, model must name the base model "
                f"({sorted(base_names)[0]!r})"
            )
        return None, merged_adapters_from_dict(body.merged_adapters)
    if body.model in base_names:
        return None, None
    return body.model, None


def completion_requests(
    body: CompletionRequest, path: RequestPath, base_names: set[str]
) -> tuple[list[GenerationRequest], pb.MergedAdapters | None]:
    """One engine request per prompt. ``max_tokens: 0`` with ``echo`` scores the prompt only:
    no token is generated (the rule book refuses 0 without echo)."""
    _check(body)
    if body.logprobs is not None and not 0 <= body.logprobs <= 5:
        raise InvalidArgument(f"logprobs must be in [0, 5], got {body.logprobs}")
    want_prompt = body.echo and (body.logprobs is not None or body.max_tokens == 0)
    params = _params(body, path, max_tokens=body.max_tokens, details=True, prompt_lp=want_prompt)
    adapter, merged = _adapter(body, base_names)
    requests = []
    for p in prompts(body):
        if isinstance(p, str):
            requests.append(generation_request(params, inputs=p, adapter_id=adapter))
        else:
            requests.append(generation_request(params, input_ids=p, adapter_id=adapter))
    return requests, merged


def chat_request(
    body: ChatRequest, path: RequestPath, base_names: set[str], tokenizer
) -> tuple[GenerationRequest, pb.MergedAdapters | None]:
    _check(body)
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidArgument(
            "this model's tokenizer has no chat template: use /v1/completions with the prompt "
            "formatted yourself"
        )
    if not body.messages:
        raise InvalidArgument("messages is empty")
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    try:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    except Exception as err:  # a template that rejects these messages (roles, order)
        raise InvalidArgument(f"messages: the chat template failed: {err}") from None
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise InvalidArgument("give max_tokens or max_completion_tokens, not both")
    max_tokens = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
    params = _params(body, path, max_tokens=max_tokens, details=True, prompt_lp=False)
    adapter, merged = _adapter(body, base_names)
    return generation_request(params, input_ids=list(ids), adapter_id=adapter), merged


# -- responses ----------------------------------------------------------------------------------


def usage(results: list[GenerationResult], *, generated: list[int]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(generated)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _logprobs(events: list[TokenEvent], offset: int) -> dict[str, Any]:
    tokens, lps, tops, offsets = [], [], [], []
    for e in events:
        lp = finite_or_none(e.logprob)
        tokens.append(e.text)
        lps.append(lp)
        tops.append(None if lp is None else {e.text: lp})
        offsets.append(offset)
        offset += len(e.text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def completion_choice(
    index: int, sub: Submission, result: GenerationResult, body: CompletionRequest, tokenizer
) -> tuple[dict[str, Any], int]:
    """(the choice, completion tokens counted)."""
    generated, text = result.tokens, result.generated_text
    prompt_text = ""
    if body.echo:
        req = sub.request
        prompt_text = req.inputs if req.inputs is not None else tokenizer.decode(req.input_ids)
    logprobs = None
    if body.logprobs is not None:
        events = (result.prompt if body.echo else []) + list(generated)
        logprobs = _logprobs(events, 0)
    choice = {
        "index": index,
        "text": prompt_text + text,
        "logprobs": logprobs,
        "finish_reason": FINISH_REASONS[result.finish_reason],  # "length" for max_tokens 0
    }
    return choice, len(generated)


def completion_response(model: str, choices: list[dict], usage_: dict) -> dict[str, Any]:
    return {
        "id": f"cmpl-{time.monotonic_ns():x}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_,
    }


def chat_response(model: str, result: GenerationResult) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{time.monotonic_ns():x}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.generated_text},
                "logprobs": None,
                "finish_reason": FINISH_REASONS[result.finish_reason],
            }
        ],
        "usage": usage([result], generated=[result.generated_tokens]),
    }


def chunk(kind: Literal["chat", "completion"], cid: str, model: str, choice: dict) -> dict:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {
        "id": cid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def error_body(status: int, message: str) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "internal_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}
