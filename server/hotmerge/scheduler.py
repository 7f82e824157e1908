"""The engine: a queue of generation requests and one worker thread that batches them.

The worker keeps a running batch: each step it runs one decode forward for the rows already
generating, prefills the rows that just arrived (left-padded, with an attention mask and
per-row position ids), joins their KV caches to the running one, then picks one token per
row. Rows that finish, fail or are cancelled leave the batch at the end of the step; new
requests join between decode steps (continuous batching). Each row has its own adapter slot.

Errors: :meth:`Engine.submit` raises InvalidArgument for a bad request, and NotFound /
InvalidArgument / ResourceExhausted from the adapter store (the adapter is resolved and
pinned at submit). Iterating a :class:`GenerationHandle` raises Cancelled (cancel or deadline),
Unavailable (engine stopped) or HotmergeError with code INTERNAL (a failure inside the worker,
which fails only the affected requests).
"""

from __future__ import annotations

import logging
import math
import queue
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from hotmerge_kernels.layout import FlatAdapter
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from hotmerge import limits
from hotmerge.adapters import AdapterStore
from hotmerge.errors import (
    Cancelled,
    HotmergeError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from hotmerge.generation import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    Timings,
    TokenEvent,
)
from hotmerge.model import ModelRunner

log = logging.getLogger(__name__)

_PROMPT_CONTEXT = 5  # prompt tokens kept as decode context, so the first token's spacing is right


def _ms(start: float, end: float) -> float:
    return (end - start) * 1000.0


# -- request side -----------------------------------------------------------------------------


@dataclass(eq=False)
class AdapterLease:
    """The adapter a request runs with, held (pinned) until the request ends."""

    weights: FlatAdapter | None
    load_ms: float = 0.0
    on_release: Callable[[], None] | None = None  # unpins it; called once
    merge_ms: float = 0.0  # spent merging it (a merged adapter on a cache miss)

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
                    self._error = Cancelled("deadline exceeded")
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


# -- text ---------------------------------------------------------------------------------------


class TextStream:
    """Incremental detokenization plus stop sequences, for one row.

    Text is decoded over a sliding window of ids (so a multi-byte character split over tokens
    comes out whole, once complete). Text that might be the start of a stop sequence is held
    back until it is known not to be; a found stop sequence and everything after it are cut.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_PROMPT_CONTEXT:])
        self.prefix = 0
        self.read = len(self.ids)
        self.text = ""  # generated text so far (stop sequence cut)
        self.emitted = 0  # characters of self.text already handed out
        self.stop = tuple(s for s in stop if s)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (text to emit now, whether a stop sequence was found)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        if not self.stop:
            return self.flush(), False
        # Text before `emitted` was checked to start no stop sequence, so search from there.
        hits = [i for s in self.stop if (i := self.text.find(s, self.emitted)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self.flush(), True
        safe = len(self.text) - self._held_suffix()
        out, self.emitted = self.text[self.emitted : safe], max(self.emitted, safe)
        return out, False

    def _held_suffix(self) -> int:
        """Length of the longest tail of the text that begins some stop sequence."""
        tail = self.text[self.emitted :]
        for n in range(min(len(tail), max(len(s) for s in self.stop) - 1), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self.stop):
                return n
        return 0

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted :], len(self.text)
        return out


# -- sampling -----------------------------------------------------------------------------------


def is_greedy(params: SamplingParams) -> bool:
    return not params.do_sample or params.temperature == 0


def apply_repetition_penalty(
    logits: torch.Tensor, seen: Sequence[int], penalty: float
) -> torch.Tensor:
    """transformers' rule: a seen token's logit is divided by the penalty if > 0, else times."""
    if penalty == 1.0 or not seen:
        return logits
    idx = torch.tensor(sorted(set(seen)), device=logits.device)
    vals = logits[idx]
    logits = logits.clone()
    logits[idx] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def sampling_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on one row of logits; -inf = removed."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        probs, order = torch.sort(torch.softmax(logits, -1), descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop_sorted = (torch.cumsum(probs, -1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def validate_params(params: SamplingParams) -> None:
    def bad(name: str, rule: str, value) -> InvalidArgument:
        return InvalidArgument(f"parameters.{name} {rule}, got {value!r}")

    if not isinstance(params.max_new_tokens, int) or params.max_new_tokens < 1:
        raise bad("max_new_tokens", "must be >= 1", params.max_new_tokens)
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


# -- the running batch --------------------------------------------------------------------------


@dataclass(eq=False)
class _Row:
    handle: GenerationHandle
    prompt_ids: list[int]
    lease: AdapterLease
    stream: TextStream
    generator: torch.Generator | None
    submitted: float  # perf_counter at submit
    queued: float  # perf_counter when it entered the queue
    queue_until: float | None = None  # monotonic: fails if still queued then (limits.py)
    timings: Timings = field(default_factory=Timings)
    generated: list[int] = field(default_factory=list)
    events: list[TokenEvent] = field(default_factory=list)
    position: int = 0  # position id of the next input token
    next_token: int = 0
    prefill_done: float = 0.0
    done: bool = False

    @property
    def params(self) -> SamplingParams:
        return self.handle.request.params


@dataclass
class EngineStats:
    """Counters for tests and metrics: batch sizes of the forwards the worker ran."""

    prefill_batch_sizes: Counter = field(default_factory=Counter)
    decode_batch_sizes: Counter = field(default_factory=Counter)
    requests_finished: int = 0
    requests_failed: int = 0

    @property
    def max_batch_size(self) -> int:
        return max([*self.prefill_batch_sizes, *self.decode_batch_sizes], default=0)


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        store: AdapterStore,
        *,
        max_batch_size: int = 8,
        max_input_tokens: int | None = None,
        max_total_tokens: int | None = None,
        batch_wait_ms: float = 2.0,
    ) -> None:
        self.runner = runner
        self.store = store
        self.max_batch_size = max_batch_size
        limit = runner.max_position_embeddings or 4096  # the model's position limit
        self.max_total_tokens = max_total_tokens or limit
        self.max_input_tokens = max_input_tokens or self.max_total_tokens - 1
        if self.max_total_tokens > limit:
            raise InvalidArgument(
                f"max_total_tokens ({self.max_total_tokens}) exceeds the model's "
                f"max_position_embeddings ({limit})"
            )
        if not 1 <= self.max_input_tokens < self.max_total_tokens:
            raise InvalidArgument(
                f"max_input_tokens ({self.max_input_tokens}) must be >= 1 and less than "
                f"max_total_tokens ({self.max_total_tokens})"
            )
        if max_batch_size < 1:
            raise InvalidArgument(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.batch_wait_ms = batch_wait_ms
        self.stats = EngineStats()
        self._pending: deque[_Row] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # The running batch (worker thread only).
        self._active: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="hotmerge-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the worker; requests still queued or running fail with Unavailable."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stopping

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    # -- submit -----------------------------------------------------------------------------

    def submit(
        self,
        request: GenerationRequest,
        *,
        deadline: float | None = None,
        adapter: AdapterLease | FlatAdapter | None = None,
    ) -> GenerationHandle:
        """Validate, resolve and pin the adapter, queue. ``adapter`` overrides adapter_id
        (e.g. a merged adapter the caller holds; a lease is released when the request ends,
        also when submit raises)."""
        submitted = time.perf_counter()
        if isinstance(adapter, AdapterLease):
            try:
                return self._submit(request, deadline, adapter, submitted)
            except BaseException:
                adapter.release()
                raise
        return self._submit(request, deadline, adapter, submitted)

    def _submit(
        self,
        request: GenerationRequest,
        deadline: float | None,
        adapter: AdapterLease | FlatAdapter | None,
        submitted: float,
    ) -> GenerationHandle:
        if not self.running:
            raise Unavailable("the engine is not running")
        validate_params(request.params)
        if not isinstance(request.inputs, str):
            raise InvalidArgument("inputs must be a string")
        limits.check_prompt_bytes(request.inputs, self.max_input_tokens)
        prompt_ids = self.runner.encode(request.inputs)
        if not prompt_ids:
            raise InvalidArgument("inputs is empty (it must give at least one token)")
        if len(prompt_ids) > self.max_input_tokens:
            raise InvalidArgument(
                f"inputs is {len(prompt_ids)} tokens, more than max_input_tokens="
                f"{self.max_input_tokens}"
            )
        params = request.params
        limits.check_max_new_tokens(params.max_new_tokens, len(prompt_ids), self.max_total_tokens)
        generator = None
        if not is_greedy(params):
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            generator = torch.Generator(device=self.runner.device).manual_seed(seed)
        handle = GenerationHandle(request, deadline)
        lease = self._resolve_adapter(request, adapter)  # pinned from here: release on every path
        row = _Row(
            handle=handle,
            prompt_ids=list(prompt_ids),
            lease=lease,
            stream=TextStream(self.runner.tokenizer, prompt_ids, params.stop),
            generator=generator,
            submitted=submitted,
            queued=time.perf_counter(),
            queue_until=limits.queue_deadline(deadline, time.monotonic()),
        )
        row.timings.adapter_load_ms = lease.load_ms
        row.timings.merge_ms = lease.merge_ms
        with self._cv:
            if self._stopping:
                lease.release()
                raise Unavailable("the engine is shutting down")
            self._pending.append(row)
            self._cv.notify_all()
        return handle

    def _resolve_adapter(
        self, request: GenerationRequest, adapter: AdapterLease | FlatAdapter | None
    ) -> AdapterLease:
        """The one place a request's adapter is found: extend here for new kinds of adapter."""
        if isinstance(adapter, AdapterLease):
            return adapter
        if adapter is not None:
            return AdapterLease(adapter)
        if request.adapter_id is None or request.adapter_id == "":
            return AdapterLease(None)
        adapter_id = request.adapter_id
        loaded, load_ms = self.store.acquire(adapter_id)
        return AdapterLease(loaded.weights, load_ms, lambda: self.store.release(adapter_id))

    # -- worker -----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            new = self._take_pending(block=not self._active)
            if new is None:
                break
            try:
                self._step(new)
            except Exception as exc:  # a failed forward fails its batch, never the worker
                log.exception("engine step failed; failing %d request(s)", len(self._active))
                err = HotmergeError(f"internal error while generating: {exc}")
                for row in self._active + [r for r in new if not r.done]:
                    self._fail(row, err)
                self._reset_batch()
        shutting = Unavailable("the engine stopped")
        for row in self._active:
            self._fail(row, shutting)
        with self._cv:
            pending, self._pending = list(self._pending), deque()
        for row in pending:
            self._fail(row, shutting)
        self._reset_batch()

    def _take_pending(self, *, block: bool) -> list[_Row] | None:
        """New rows to admit (may be empty); None when the engine is stopping."""
        with self._cv:
            if block:
                while not self._pending and not self._stopping:
                    self._cv.wait()
                # After the first arrives, wait a little for more to batch them together.
                until = time.monotonic() + self.batch_wait_ms / 1000
                while (
                    len(self._pending) < self.max_batch_size
                    and not self._stopping
                    and (left := until - time.monotonic()) > 0
                ):
                    self._cv.wait(left)
            if self._stopping:
                return None
            # Queued requests cancelled or past their deadline leave now (and unpin adapters).
            now = time.monotonic()
            gone = [
                r
                for r in self._pending
                if r.handle.cancelled or r.handle.expired(now) or now >= r.queue_until
            ]
            for row in gone:
                self._pending.remove(row)
                self._still_wanted(row)
            if self._active and not self._can_join():
                return []
            rows = []
            while self._pending and len(self._active) + len(rows) < self.max_batch_size:
                rows.append(self._pending.popleft())
        return [r for r in rows if self._still_wanted(r)]

    def _can_join(self) -> bool:
        # Joining caches of different lengths is only right for plain (non-sliding) layers.
        return self._cache is not None and all(
            type(layer) is DynamicLayer for layer in self._cache.layers
        )

    def _still_wanted(self, row: _Row) -> bool:
        if row.handle.cancelled:
            self._fail(row, Cancelled("cancelled"))
        elif row.handle.expired():
            self._fail(row, Cancelled("deadline exceeded"))
        elif row.position == 0 and time.monotonic() >= row.queue_until:  # still queued
            self._fail(row, ResourceExhausted(
                f"waited {limits.MAX_QUEUE_WAIT_S:g} s (the server maximum) in the queue; the "
                "server is busy: retry later or on another replica"
            ))  # fmt: skip
        return not row.done

    def _step(self, new: list[_Row]) -> None:
        # 1. Rows whose client went away or whose deadline passed leave before any work.
        kept = [i for i, row in enumerate(self._active) if self._still_wanted(row)]
        self._keep(kept)
        logits = []
        # 2. One decode step for the running rows.
        if self._active:
            logits.append(self._decode())
        # 3. Prefill the new rows and join them to the running batch.
        if new:
            logits.append(self._prefill(new))
        if not self._active:
            return
        all_logits = torch.cat(logits) if len(logits) > 1 else logits[0]
        # 4. One token per row; finished rows leave the batch.
        kept = []
        tokens, logprobs = self._pick_tokens(all_logits)
        for i, row in enumerate(self._active):
            try:
                self._emit(row, tokens[i], logprobs[i])
            except Exception as exc:  # one row's failure is that row's alone
                log.exception("request failed while emitting a token")
                self._fail(row, HotmergeError(f"internal error while generating: {exc}"))
            if not row.done:
                kept.append(i)
        self._keep(kept)

    def _slots(self, rows: Sequence[_Row]) -> list[FlatAdapter | None]:
        return [r.lease.weights for r in rows]

    def _decode(self) -> torch.Tensor:
        rows, device = self._active, self.runner.device
        ids = torch.tensor([[r.next_token] for r in rows], device=device)
        pos = torch.tensor([[r.position] for r in rows], device=device)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        logits = self.runner.forward(ids, self._mask, pos, self._cache, self._slots(rows))
        for r in rows:
            r.position += 1
        self.stats.decode_batch_sizes[len(rows)] += 1
        return logits

    def _prefill(self, rows: list[_Row]) -> torch.Tensor:
        start, device = time.perf_counter(), self.runner.device
        width = max(len(r.prompt_ids) for r in rows)
        pad = self.runner.pad_token_id
        ids = torch.tensor(
            [[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=device
        )
        mask = torch.tensor(
            [[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows],
            device=device,
        )
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.runner.model.config)
        logits = self.runner.forward(ids, mask, pos, cache, self._slots(rows))
        done = time.perf_counter()
        for r in rows:
            r.position = len(r.prompt_ids)
            r.timings.queue_ms = _ms(r.queued, start)
            r.timings.prefill_ms = _ms(start, done)
            r.prefill_done = done
        self._join(rows, cache, mask)
        self.stats.prefill_batch_sizes[len(rows)] += 1
        log.info(
            "prefill %d request(s), %d tokens padded to %d; running batch now %d",
            len(rows),
            sum(len(r.prompt_ids) for r in rows),
            width,
            len(self._active),
        )
        return logits

    def _join(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append prefilled rows to the running batch, left-padding the shorter KV cache."""
        if not self._active:
            self._active, self._cache, self._mask = list(rows), cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])

        def left_pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for old, add in zip(self._cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([left_pad(old.keys, 2), left_pad(add.keys, 2)])
            old.values = torch.cat([left_pad(old.values, 2), left_pad(add.values, 2)])
        self._mask = torch.cat([left_pad(self._mask, 1), left_pad(mask, 1)])
        self._active.extend(rows)

    def _keep(self, indices: list[int]) -> None:
        """Keep only these rows of the running batch; drop padding no row needs any more."""
        if len(indices) == len(self._active):
            return
        if not indices:
            self._reset_batch()
            return
        self._active = [self._active[i] for i in indices]
        idx = torch.tensor(indices, device=self.runner.device)
        self._cache.batch_select_indices(idx)
        self._mask = self._mask[idx]
        first = int(self._mask.any(0).int().argmax())  # leading columns that are all padding
        if first > 0 and self._can_join():  # a sliding-window cache is not column-aligned
            self._mask = self._mask[:, first:]
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]

    def _reset_batch(self) -> None:
        self._active, self._cache, self._mask = [], None, None
        self.runner.slots.reset()  # idle: hold no adapter (an unloaded one's memory goes back)

    # -- tokens -----------------------------------------------------------------------------

    def _pick_tokens(self, logits: torch.Tensor) -> tuple[list[int], list[float]]:
        """One token per row: greedy rows in one argmax; sampled rows one by one."""
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        greedy = logits.argmax(dim=-1)
        tokens = greedy.tolist()
        logprobs = raw_logprobs.gather(1, greedy[:, None]).squeeze(1).tolist()
        for i, row in enumerate(self._active):
            params = row.params
            if is_greedy(params) and params.repetition_penalty == 1.0:
                continue
            try:
                tokens[i], lp = self._pick_one(row, logits[i])
                # Greedy logprobs are of the raw distribution; sampled ones of the processed.
                logprobs[i] = float(raw_logprobs[i, tokens[i]]) if lp is None else lp
            except Exception as exc:
                log.exception("request failed while sampling")
                self._fail(row, HotmergeError(f"internal error while sampling: {exc}"))
        return tokens, logprobs

    def _pick_one(self, row: _Row, logits: torch.Tensor) -> tuple[int, float | None]:
        params = row.params
        logits = apply_repetition_penalty(
            logits, row.prompt_ids + row.generated, params.repetition_penalty
        )
        if is_greedy(params):
            return int(logits.argmax()), None
        logits = sampling_logits(logits, params)
        logprobs = torch.log_softmax(logits, dim=-1)
        token = int(torch.multinomial(logprobs.exp(), 1, generator=row.generator))
        return token, float(logprobs[token])

    def _emit(self, row: _Row, token: int, logprob: float) -> None:
        if row.done:  # failed while sampling
            return
        row.generated.append(token)
        finish = None
        if token in self.runner.eos_token_ids:
            text, finish = row.stream.flush(), FinishReason.EOS
        else:
            text, stopped = row.stream.push(token)
            if stopped:
                finish = FinishReason.STOP_SEQUENCE
            elif (
                len(row.generated) >= row.params.max_new_tokens
                or len(row.prompt_ids) + len(row.generated) >= self.max_total_tokens
            ):
                finish = FinishReason.LENGTH
                text += row.stream.flush()
        event = TokenEvent(token_id=token, text=text, logprob=logprob)
        row.events.append(event)
        row.next_token = token
        row.handle._put(event)
        if finish is not None:
            self._finish(row, finish)

    def _finish(self, row: _Row, reason: FinishReason) -> None:
        now = time.perf_counter()
        row.timings.decode_ms = _ms(row.prefill_done, now)
        row.timings.total_ms = _ms(row.submitted, now)
        result = GenerationResult(
            generated_text=row.stream.text,
            finish_reason=reason,
            generated_tokens=len(row.generated),
            tokens=row.events,
            timings=row.timings,
        )
        self._end(row)
        self.stats.requests_finished += 1
        log.debug(
            "request done: adapter=%s prompt=%d generated=%d finish=%s queue=%.1fms "
            "prefill=%.1fms decode=%.1fms total=%.1fms",
            row.handle.request.adapter_id,
            len(row.prompt_ids),
            len(row.generated),
            reason.value,
            row.timings.queue_ms,
            row.timings.prefill_ms,
            row.timings.decode_ms,
            row.timings.total_ms,
        )
        row.handle._put(result)

    def _fail(self, row: _Row, error: HotmergeError) -> None:
        if row.done:
            return
        self._end(row)
        self.stats.requests_failed += 1
        log.debug("request failed: %s", error)
        row.handle._put(error)

    def _end(self, row: _Row) -> None:
        row.done = True
        row.lease.release()
