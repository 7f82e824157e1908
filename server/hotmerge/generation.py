"""What a generation request is and what comes back, independent of the wire format.

The service turns protobuf messages into these; the scheduler and model runner see only these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(enum.Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    do_sample: bool = False  # False: greedy
    seed: int | None = None
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    details: bool = False
    prompt_logprobs: bool = False  # also return each prompt token's logprob (given the ones before)


@dataclass(frozen=True)
class GenerationRequest:
    """Exactly one of ``inputs`` (text, tokenized by the engine) and ``input_ids`` is set."""

    inputs: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter_id: str | None = None  # None: the base model
    input_ids: tuple[int, ...] | None = None  # prompt token ids, used as given


@dataclass
class Timings:
    """Milliseconds spent on each stage of one request."""

    queue_ms: float = 0.0
    adapter_load_ms: float = 0.0
    merge_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(frozen=True)
class TokenEvent:
    """One generated token; ``text`` is what it adds to the decoded output (may be empty)."""

    token_id: int
    text: str
    logprob: float


@dataclass
class GenerationResult:
    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    tokens: list[TokenEvent]
    timings: Timings
    prompt_tokens: int = 0  # how many tokens the prompt was
    # With params.prompt_logprobs: one event per prompt token; the first has logprob nan
    # (nothing comes before it).
    prompt: list[TokenEvent] = field(default_factory=list)
