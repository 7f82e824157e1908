"""One request's state inside the engine, from submit to its end."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from hotmerge.engine.block_manager import BlockTable
from hotmerge.engine.detok import TextStream
from hotmerge.engine.requests import AdapterLease, GenerationHandle
from hotmerge.generation import (
    FinishReason,
    GenerationResult,
    SamplingParams,
    Timings,
    TokenEvent,
)


@dataclass(eq=False)
class Sequence:
    """A request's prompt, tokens, KV blocks and adapter slot. The scheduler moves it through
    waiting -> running -> done (and back to waiting when preempted); the engine fills in its
    timings and streams its tokens."""

    seq_id: int
    handle: GenerationHandle
    prompt_ids: list[int]
    lease: AdapterLease
    stream: TextStream
    seed: int
    submitted: float  # perf_counter at submit
    queued: float
    queue_until: float  # monotonic: fails if still queued then (limits.queue_deadline)
    timings: Timings = field(default_factory=Timings)
    generated: list[int] = field(default_factory=list)
    events: list[TokenEvent] = field(default_factory=list)
    prompt_scores: list[float] = field(default_factory=list)
    kv_key: Hashable = None  # what its KV was computed with (adapter, merge; None: the base)
    table: BlockTable | None = None  # its KV blocks while running
    admitted_order: int = -1  # larger: admitted later (preemption takes the latest first)
    slot: int = -1  # the adapter slot it reads (-1: the base model)
    prefilled: int = 0  # tokens in the KV cache (cached prefix, then prefilled)
    # Tokens prefilled before it decodes: its prompt; after a preemption, also every generated
    # token but the last (the next decode step feeds that one).
    prefill_end: int = -1
    preemptions: int = 0
    prefill_started: float = 0.0
    prefill_done: float = 0.0
    ending: FinishReason | None = None  # its last token ends it (EOS, length): not emitted yet
    # Tokens sampled by launched steps and not on the host yet (0-2), and the latest one's index
    # among its step's sampled rows (a step planned ahead feeds it from the device).
    pending: int = 0
    pending_index: int = -1
    done: bool = False

    def __post_init__(self) -> None:
        if self.prefill_end < 0:
            self.prefill_end = len(self.prompt_ids)

    @property
    def params(self) -> SamplingParams:
        return self.handle.request.params

    @property
    def prefilling(self) -> bool:
        return self.prefilled < self.prefill_end

    @property
    def resumed(self) -> bool:
        """Re-prefilling after a preemption, its tokens so far already emitted."""
        return self.prefill_end > len(self.prompt_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        """Its tokens ``start:end`` (prompt, then generated) without copying the rest."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.generated[start - n : end - n]
        return self.prompt_ids[start:] + self.generated[: end - n]

    def push(self, token: int, logprob: float) -> FinishReason | None:
        """Stream a taken token to the handle (its text; stop sequences held back, then cut);
        returns why the request ends with it, if it does."""
        finish = None
        if self.ending is FinishReason.EOS:
            text, finish = self.stream.flush(), FinishReason.EOS
        else:
            text, stopped = self.stream.push(token)
            if stopped:
                finish = FinishReason.STOP_SEQUENCE
            elif self.ending is FinishReason.LENGTH:
                finish = FinishReason.LENGTH
                text += self.stream.flush()
        event = TokenEvent(token_id=token, text=text, logprob=logprob)
        self.events.append(event)
        self.handle._put(event)
        return finish

    def result(self, reason: FinishReason, decode: Callable[[list[int]], str]) -> GenerationResult:
        """The final result, its timings closed now; ``decode``: the tokenizer's, for the
        prompt's tokens when prompt logprobs were asked for."""
        now = time.perf_counter()
        if self.generated:
            self.timings.decode_ms = _ms(self.prefill_done, now)
        self.timings.total_ms = _ms(self.submitted, now)
        prompt = []
        if self.params.prompt_logprobs:
            logprobs = [math.nan, *self.prompt_scores]
            prompt = [
                TokenEvent(token_id=t, text=decode([t]), logprob=lp)
                for t, lp in zip(self.prompt_ids, logprobs, strict=True)
            ]
        return GenerationResult(
            generated_text=self.stream.text,
            finish_reason=reason,
            generated_tokens=len(self.generated),
            tokens=self.events,
            timings=self.timings,
            prompt_tokens=len(self.prompt_ids),
            prompt=prompt,
        )


def _ms(start: float, end: float) -> float:
    return (end - start) * 1000.0
