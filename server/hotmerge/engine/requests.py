"""The request side of the engine: the adapter a request holds, the handle a caller waits on,
and the rules a request's parameters must follow (the same messages on every front)."""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from hotmerge_kernels.layout import FlatAdapter

from hotmerge import limits
from hotmerge.errors import DeadlineExceeded, HotmergeError, InvalidArgument
from hotmerge.generation import GenerationRequest, GenerationResult, SamplingParams, TokenEvent


@dataclass(eq=False)
class AdapterLease:
    """The adapter a request runs with, held (pinned) until the request ends."""

    weights: FlatAdapter | None
    load_ms: float = 0.0
    on_release: Callable[[], None] | None = None  # unpins it; called once
    merge_ms: float = 0.0  # spent merging it (a merged adapter on a cache miss)
    name: str | None = None  # adapter id, named merge or merge key: for logs and metrics

    def release(self) -> None:
        on_release, self.on_release = self.on_release, None
        if on_release is not None:
            on_release()


class GenerationHandle:
    """One submitted request: iterate it for its tokens, or :meth:`wait` for the result."""

    def __init__(self, request: GenerationRequest, deadline: float | None) -> None:
        self.request = request
        self.deadline = deadline  # time.monotonic() value
        self.result: GenerationResult | None = None  # set when iteration finished normally
        self._error: HotmergeError | None = None
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop work for this request; its row leaves the batch at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now or time.monotonic()) >= self.deadline

    def __iter__(self) -> Iterator[TokenEvent]:
        """Tokens as they come. Iterating again after the end yields nothing (or re-raises)."""
        if self.result is not None:
            return
        if self._error is not None:
            raise self._error
        try:
            while True:
                timeout = None
                if self.deadline is not None:
                    timeout = max(0.0, self.deadline - time.monotonic())
                try:
                    item = self._events.get(timeout=timeout)
                except queue.Empty:
                    self._error = DeadlineExceeded("deadline exceeded")
                    raise self._error from None
                if isinstance(item, TokenEvent):
                    yield item
                elif isinstance(item, GenerationResult):
                    self.result = item
                    return
                else:
                    self._error = item
                    raise item
        finally:
            if self.result is None:  # abandoned, failed or expired: stop the worker's work too
                self.cancel()

    def wait(self) -> GenerationResult:
        for _ in self:
            pass
        assert self.result is not None
        return self.result

    # called by the worker
    def _put(self, item: TokenEvent | GenerationResult | BaseException) -> None:
        self._events.put(item)


def validate_params(params: SamplingParams) -> None:
    def bad(name: str, rule: str, value) -> InvalidArgument:
        return InvalidArgument(f"parameters.{name} {rule}, got {value!r}")

    least = 0 if params.prompt_logprobs else 1  # 0 only scores the prompt
    if not isinstance(params.max_new_tokens, int) or params.max_new_tokens < least:
        raise bad("max_new_tokens", f"must be >= {least}", params.max_new_tokens)
    if not math.isfinite(params.temperature) or params.temperature < 0:
        raise bad("temperature", "must be a finite number >= 0", params.temperature)
    limits.check_temperature(params.temperature)
    if not 0 < params.top_p <= 1:
        raise bad("top_p", "must be in (0, 1]", params.top_p)
    if params.top_k < 0:
        raise bad("top_k", "must be >= 0 (0: off)", params.top_k)
    if not math.isfinite(params.repetition_penalty) or params.repetition_penalty <= 0:
        raise bad("repetition_penalty", "must be a finite number > 0", params.repetition_penalty)
    if any(not s for s in params.stop):
        raise bad("stop", "must not contain empty strings", params.stop)


def prompt_token_ids(request: GenerationRequest, runner, max_input_tokens: int) -> list[int]:
    """The prompt: ``inputs`` encoded by ``runner``, or ``input_ids`` checked and used as given."""
    if (request.inputs is None) == (request.input_ids is None):
        raise InvalidArgument("give exactly one of inputs (text) and input_ids (token ids)")
    if request.input_ids is not None:
        field_name, ids = "input_ids", list(request.input_ids)
        vocab = runner.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidArgument(
                f"input_ids: {bad[0]!r} is not a token id of this model (0 <= id < {vocab})"
            )
    elif not isinstance(request.inputs, str):
        raise InvalidArgument("inputs must be a string")
    else:
        limits.check_prompt_bytes(request.inputs, max_input_tokens)
        field_name, ids = "inputs", runner.encode(request.inputs)
    if not ids:
        raise InvalidArgument(f"{field_name} is empty (it must give at least one token)")
    if len(ids) > max_input_tokens:
        raise InvalidArgument(
            f"{field_name} is {len(ids)} tokens, more than max_input_tokens={max_input_tokens}"
        )
    return ids
