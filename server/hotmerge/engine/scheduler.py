"""The engine: a queue of generation requests and one worker thread that steps the batch.

Pure Python: the scheduler decides who runs and hands the runner plain data (prefill chunks,
decode rows); the runner does every tensor operation and returns token ids and logprobs.

Each step: rows whose client left or whose deadline passed leave; queued requests are admitted
while the batch has room, the KV cache can hold their worst case (prompt + max_new_tokens,
reserved, taken block by block as tokens come) and an adapter slot is free (or already holds
their adapter); then one decode step for the generating rows and up to ``max_prefill_tokens``
of prompt for the rows still prefilling (long prompts go in chunks, so a new prompt never stalls
the running rows for long), then one token per row that needs one. Rows that finish, fail or are
cancelled give their blocks and slot back at once (continuous batching).

The host work of a step overlaps the device's: a step waits for the one in flight and takes
its tokens (cheap: EOS and length are known at once), launches the next, and only then
detokenizes and streams the tokens it took and admits new requests while the device runs. A
row that a stop sequence ends is already in the launched step: that token is dropped.

Errors: requests come checked by the request path (``hotmerge.request_rules``), which gives
the prompt as token ids; :meth:`Engine.submit` raises NotFound / InvalidArgument /
ResourceExhausted from the adapter store (the adapter is resolved and pinned at submit).
Iterating a :class:`GenerationHandle` raises Cancelled (cancel or deadline), Unavailable
(engine stopped) or HotmergeError with code INTERNAL (a failure inside the worker, which fails
only the affected requests).
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from hotmerge_kernels.layout import FlatAdapter

from hotmerge import request_rules as rules
from hotmerge.adapters.store import AdapterStore
from hotmerge.engine.batch import DecodeRow, PrefillChunk
from hotmerge.engine.detok import TextStream, text_decoder
from hotmerge.engine.kv_cache import KVBlockPool, blocks_for
from hotmerge.engine.requests import AdapterLease, GenerationHandle
from hotmerge.engine.runner import ModelRunner
from hotmerge.engine.sampling import RowSampling
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
    Timings,
    TokenEvent,
)

log = logging.getLogger(__name__)


def _ms(start: float, end: float) -> float:
    return (end - start) * 1000.0


class _Lap:
    """Adds the time since the previous lap to a phase's total: where a step's time goes."""

    __slots__ = ("totals", "last")

    def __init__(self, totals: Counter) -> None:
        self.totals, self.last = totals, time.perf_counter()

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.totals[phase] += now - self.last
        self.last = now


@dataclass(eq=False)
class _Row:
    """One request's state in the engine."""

    seq_id: int
    handle: GenerationHandle
    prompt_ids: list[int]
    lease: AdapterLease
    stream: TextStream
    seed: int
    submitted: float  # perf_counter at submit
    queued: float
    worst_tokens: int  # prompt + the most it may generate: what admission reserves
    queue_until: float  # monotonic: fails if still queued then (rules.queue_deadline)
    timings: Timings = field(default_factory=Timings)
    generated: list[int] = field(default_factory=list)
    events: list[TokenEvent] = field(default_factory=list)
    prompt_scores: list[float] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    reserved: int = 0  # blocks reserved and not yet taken
    slot: int = -1
    prefilled: int = 0  # prompt tokens in the KV cache
    prefill_started: float = 0.0
    prefill_done: float = 0.0
    ending: FinishReason | None = None  # its last token ends it (EOS, length): not emitted yet
    done: bool = False

    @property
    def params(self):
        return self.handle.request.params

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt_ids)


@dataclass(eq=False)
class _Group:
    """One launched step: the rows getting a token (in the order of the logits), the rows whose
    prompt chunks ran, and the sampler to wait on; then the tokens, until they are emitted."""

    rows_out: list[_Row]
    chunk_rows: list[_Row]
    sampled: object  # the runner's Sampler: .wait() -> (tokens, logprobs)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


@dataclass
class EngineStats:
    """Counters for tests and metrics: sizes of the forwards the worker ran."""

    prefill_batch_sizes: Counter = field(default_factory=Counter)
    decode_batch_sizes: Counter = field(default_factory=Counter)
    requests_finished: int = 0
    requests_failed: int = 0
    steps: int = 0
    step_phase_s: Counter = field(default_factory=Counter)  # seconds per phase of the steps

    @property
    def max_batch_size(self) -> int:
        return max([*self.prefill_batch_sizes, *self.decode_batch_sizes], default=0)


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        store: AdapterStore,
        *,
        max_batch_size: int | None = None,
        max_input_tokens: int | None = None,
        max_total_tokens: int | None = None,
        batch_wait_ms: float = 2.0,
        max_prefill_tokens: int | None = None,
    ) -> None:
        self.runner = runner
        self.store = store
        limits = getattr(runner, "limits", None)
        if max_batch_size is None:
            max_batch_size = limits.max_batch_size if limits else 8
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens or (
            limits.max_prefill_tokens if limits else 2048
        )
        limit = runner.max_total_tokens
        self.max_total_tokens = max_total_tokens or limit
        self.max_input_tokens = max_input_tokens or self.max_total_tokens - 1
        if self.max_total_tokens > limit:
            raise InvalidArgument(
                f"max_total_tokens ({self.max_total_tokens}) exceeds what the runner was built "
                f"for ({limit}, at most the model's max_position_embeddings)"
            )
        if not 1 <= self.max_input_tokens < self.max_total_tokens:
            raise InvalidArgument(
                f"max_input_tokens ({self.max_input_tokens}) must be >= 1 and less than "
                f"max_total_tokens ({self.max_total_tokens})"
            )
        if not 1 <= self.max_batch_size <= (limits.max_batch_size if limits else 1 << 30):
            raise InvalidArgument(
                f"max_batch_size must be in [1, {limits.max_batch_size}] (what the runner was "
                f"built for), got {self.max_batch_size}"
            )
        self.batch_wait_ms = batch_wait_ms
        self.kv = KVBlockPool(runner.num_blocks, runner.block_size)
        self._decode_text = text_decoder(runner.tokenizer)
        self.stats = EngineStats()
        self._pending: deque[_Row] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._running: list[_Row] = []  # admitted rows, in admission order (worker thread only)
        self._inflight: _Group | None = None  # the step launched and not yet waited on

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

    # -- gauges (read from other threads: approximate by design) ---------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def running_requests(self) -> int:
        return len(self._running)

    @property
    def kv_cache_usage(self) -> float:
        return self.kv.usage

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv.capacity_tokens

    def adapter_names(self) -> tuple[list[str], list[str]]:
        """Names of the adapters of running and of waiting requests."""

        def names(rows) -> list[str]:
            return sorted({r.lease.name for r in rows if r.lease.name})

        return names(list(self._running)), names(list(self._pending))

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
        params = request.params
        if request.input_ids is not None:
            prompt_ids = list(request.input_ids)
        else:
            prompt_ids = self.runner.encode(request.inputs)
        worst = len(prompt_ids) + params.max_new_tokens
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        handle = GenerationHandle(request, deadline)
        lease = self._resolve_adapter(request, adapter)  # pinned from here: release on every path
        if lease.weights is not None:
            reason = self.runner.adapters.check(lease.weights)
            if reason is not None:
                lease.release()
                raise InvalidArgument(f"adapter {lease.name or ''}: {reason}".replace(" :", ":"))
        row = _Row(
            seq_id=next(self._ids),
            handle=handle,
            prompt_ids=list(prompt_ids),
            lease=lease,
            stream=TextStream(self._decode_text, prompt_ids, params.stop),
            seed=seed,
            submitted=submitted,
            queued=time.perf_counter(),
            worst_tokens=worst,
            queue_until=rules.queue_deadline(deadline, time.monotonic()),
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
        if not request.adapter_id:
            return AdapterLease(None)
        adapter_id = request.adapter_id
        loaded, load_ms = self.store.acquire(adapter_id)
        return AdapterLease(
            loaded.weights, load_ms, lambda: self.store.release(adapter_id), name=adapter_id
        )

    # -- worker -----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            if not self._admit():
                break
            if not self._running:
                self._inflight = None  # its rows all ended: nothing left to read from it
                continue
            try:
                self._step()
            except Exception as exc:  # a failed forward fails its batch, never the worker
                log.exception("engine step failed; failing %d request(s)", len(self._running))
                self._inflight = None
                err = HotmergeError(f"internal error while generating: {exc}")
                for row in list(self._running):
                    self._fail(row, err)
        shutting = Unavailable("the engine stopped")
        for row in list(self._running):
            self._fail(row, shutting)
        with self._cv:
            pending, self._pending = list(self._pending), deque()
        for row in pending:
            self._fail(row, shutting)

    def _admit(self) -> bool:
        """Move queued requests into the batch while they fit; False when stopping."""
        with self._cv:
            if not self._running:
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
                return False
            lap = _Lap(self.stats.step_phase_s)  # after the waits: only the work is counted
            # Queued requests cancelled or past their deadline leave now (and unpin adapters).
            now = time.monotonic()
            gone = [
                r
                for r in self._pending
                if r.handle.cancelled or r.handle.expired(now) or now >= r.queue_until
            ]
            for row in gone:
                self._pending.remove(row)
            admitted = []
            while self._pending and len(self._running) + len(admitted) < self.max_batch_size:
                row = self._pending[0]
                blocks = blocks_for(row.worst_tokens, self.kv.block_size)
                weights = row.lease.weights
                if not self.kv.can_reserve(blocks) or (
                    weights is not None and not self.runner.adapters.can_take(weights)
                ):
                    break  # first come, first served: wait for room rather than skip ahead
                self._pending.popleft()
                self.kv.reserve(blocks)
                row.reserved = blocks
                admitted.append(row)
        for row in gone:
            self._still_wanted(row)
        for row in admitted:
            self._running.append(row)
            try:
                if row.lease.weights is not None:
                    row.slot, _ = self.runner.adapters.take(row.lease.weights)
            except Exception as exc:
                log.exception("writing an adapter into its slot failed")
                self._fail(row, HotmergeError(f"internal error while loading the adapter: {exc}"))
        lap("admit")
        return True

    def _still_wanted(self, row: _Row) -> bool:
        if row.handle.cancelled:
            self._fail(row, Cancelled("cancelled"))
        elif row.handle.expired():
            self._fail(row, Cancelled("deadline exceeded"))
        elif time.monotonic() >= row.queue_until and row not in self._running:  # still queued
            self._fail(row, ResourceExhausted(
                f"waited {rules.MAX_QUEUE_WAIT_S:g} s (the server maximum) in the queue; the "
                "server is busy: retry later or on another replica"
            ))  # fmt: skip
        return not row.done

    def _grow(self, row: _Row, tokens: int) -> None:
        """Make sure the row's blocks cover its first ``tokens`` positions."""
        missing = blocks_for(tokens, self.kv.block_size) - len(row.blocks)
        if missing > 0:
            row.blocks.extend(self.kv.take(missing))
            row.reserved -= missing

    def _step(self) -> None:
        """Wait for the step in flight and take its tokens, launch the next step, then emit
        the tokens taken while the device runs it (detokenizing, streaming, stop sequences)
        and return (admission, too, runs while the device works). A row that a stop sequence
        ends while it is in the launched step has that step's token dropped."""
        self.stats.steps += 1
        lap = _Lap(self.stats.step_phase_s)
        waited = self._inflight
        self._inflight = None
        if waited is not None:
            self._collect(waited)
            lap("wait")
        for row in list(self._running):  # clients gone or deadlines passed: leave before work
            self._still_wanted(row)
        self._inflight = self._launch(lap)
        if waited is not None:
            taken = zip(waited.rows_out, waited.tokens, waited.logprobs, strict=True)
            for r, token, logprob in taken:
                try:
                    self._emit(r, token, logprob)
                except Exception as exc:  # one row's failure is that row's alone
                    log.exception("request failed while emitting a token")
                    self._fail(r, HotmergeError(f"internal error while generating: {exc}"))
            lap("emit")

    def _launch(self, lap: _Lap) -> _Group | None:
        """Queue one decode step for the generating rows, the next prompt chunks and the
        sampling of every row that gets a token; nothing waits for the device here."""
        decoding = [r for r in self._running if not r.prefilling and r.ending is None]
        chunks, chunk_rows = self._plan_prefill()
        if not decoding and not chunks:
            return None
        rows_out = []  # rows getting a token, in the order of the logits
        decode_logits = prefill_logits = None
        now = time.perf_counter()
        if decoding:
            batch = []
            for r in decoding:
                position = len(r.prompt_ids) + len(r.generated) - 1
                self._grow(r, position + 1)
                batch.append(DecodeRow(r.seq_id, r.generated[-1], position, r.blocks, r.slot))
            lap("prepare")
            decode_logits = self.runner.decode(batch)
            self.stats.decode_batch_sizes[len(batch)] += 1
            rows_out.extend(decoding)
            lap("decode")
        if chunks:
            for r in chunk_rows:
                if not r.prefill_started:
                    r.prefill_started = now
                    r.timings.queue_ms = _ms(r.queued, now)
            prefill_logits, scores = self.runner.prefill(chunks)
            self.stats.prefill_batch_sizes[len(chunks)] += 1
            for r, c, score in zip(chunk_rows, chunks, scores, strict=True):
                r.prefilled += len(c.token_ids)
                r.prompt_scores.extend(score)
            rows_out.extend(r for r, c in zip(chunk_rows, chunks, strict=True) if c.last)
            lap("prefill")
        sampling = [
            RowSampling(
                r.params,
                r.seed,
                len(r.generated),
                r.prompt_ids + r.generated if r.params.repetition_penalty != 1.0 else (),
            )
            for r in rows_out
        ]
        lap("prepare")
        sampled = self.runner.sample([decode_logits, prefill_logits], sampling)
        lap("sample")
        return _Group(rows_out, chunk_rows, sampled)

    def _collect(self, group: _Group) -> None:
        """The launched step's tokens, once on the host, taken by their rows (rows that ended
        meanwhile take nothing)."""
        group.tokens, group.logprobs = group.sampled.wait()
        done = time.perf_counter()
        for r in group.chunk_rows:
            if not r.prefilling and not r.prefill_done:
                r.prefill_done = done
                r.timings.prefill_ms = _ms(r.prefill_started, done)
                if r.params.max_new_tokens == 0:  # prompt scoring only
                    self._finish(r, FinishReason.LENGTH)
        for r, token in zip(group.rows_out, group.tokens, strict=True):
            if not r.done:
                self._take(r, token)

    def _plan_prefill(self) -> tuple[list[PrefillChunk], list[_Row]]:
        """The next prompt chunks, up to ``max_prefill_tokens`` (at least one chunk)."""
        budget = self.max_prefill_tokens
        chunks, rows = [], []
        for r in self._running:
            if not r.prefilling or (budget <= 0 and chunks):
                continue
            start = r.prefilled
            end = min(len(r.prompt_ids), start + max(budget, 1))
            budget -= end - start
            self._grow(r, end)
            final = end == len(r.prompt_ids)
            chunks.append(
                PrefillChunk(
                    seq_id=r.seq_id,
                    token_ids=r.prompt_ids[start:end],
                    start=start,
                    block_table=r.blocks,
                    slot=r.slot,
                    last=final and r.params.max_new_tokens > 0,
                    score=r.params.prompt_logprobs,
                    next_token=None if final else r.prompt_ids[end],
                )
            )
            rows.append(r)
        return chunks, rows

    # -- tokens -----------------------------------------------------------------------------

    def _take(self, row: _Row, token: int) -> None:
        """The row's next token: what the next step feeds it, and whether it ends the row
        (EOS, length; a stop sequence shows only once detokenized, in ``_emit``)."""
        row.generated.append(token)
        if token in self.runner.eos_token_ids:
            row.ending = FinishReason.EOS
        elif (
            len(row.generated) >= row.params.max_new_tokens
            or len(row.prompt_ids) + len(row.generated) >= self.max_total_tokens
        ):
            row.ending = FinishReason.LENGTH

    def _emit(self, row: _Row, token: int, logprob: float) -> None:
        """Stream a taken token (its text, stop sequences) and finish the row if it ends."""
        if row.done:
            return
        finish = None
        if row.ending is FinishReason.EOS:
            text, finish = row.stream.flush(), FinishReason.EOS
        else:
            text, stopped = row.stream.push(token)
            if stopped:
                finish = FinishReason.STOP_SEQUENCE
            elif row.ending is FinishReason.LENGTH:
                finish = FinishReason.LENGTH
                text += row.stream.flush()
        event = TokenEvent(token_id=token, text=text, logprob=logprob)
        row.events.append(event)
        row.handle._put(event)
        if finish is not None:
            self._finish(row, finish)

    def _prompt_events(self, row: _Row) -> list[TokenEvent]:
        if not row.params.prompt_logprobs:
            return []
        decode = self.runner.tokenizer.decode
        logprobs = [math.nan, *row.prompt_scores]
        return [
            TokenEvent(token_id=t, text=decode([t]), logprob=lp)
            for t, lp in zip(row.prompt_ids, logprobs, strict=True)
        ]

    def _finish(self, row: _Row, reason: FinishReason) -> None:
        now = time.perf_counter()
        if row.generated:
            row.timings.decode_ms = _ms(row.prefill_done, now)
        row.timings.total_ms = _ms(row.submitted, now)
        result = GenerationResult(
            generated_text=row.stream.text,
            finish_reason=reason,
            generated_tokens=len(row.generated),
            tokens=row.events,
            timings=row.timings,
            prompt_tokens=len(row.prompt_ids),
            prompt=self._prompt_events(row),
        )
        self._end(row)
        self.stats.requests_finished += 1
        log.debug(
            "request done: adapter=%s prompt=%d generated=%d finish=%s queue=%.1fms "
            "prefill=%.1fms decode=%.1fms total=%.1fms",
            row.lease.name,
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
        """Give back everything the row holds: blocks, reservation, slot, cache, adapter."""
        row.done = True
        if row in self._running:
            self._running.remove(row)
            self.kv.release(row.blocks, row.reserved)
            row.blocks, row.reserved = [], 0
            if row.slot >= 0:
                self.runner.adapters.release(row.slot)
                row.slot = -1
            self.runner.release(row.seq_id)
        row.lease.release()
