"""The engine's worker thread: schedule -> run -> postprocess -> emit.

The host work of a step overlaps the device's. Planned ahead (the default where the runner
``plans_ahead`` and the scheduler ``can_plan_ahead``): a step launches the next one before it
waits for the one in flight, each decode row fed its token from that step's sampled tokens on
the device (a repetition penalty counts it as seen there too), so the device goes from step
to step without waiting for the host; then it takes the in-flight step's tokens, detokenizes
and streams them, and admits new requests while the device runs. Otherwise (a row that would
preempt, or ``plan_ahead`` off) it waits first, then launches. A sequence that
its tokens end (EOS, a stop sequence) is already in the launched step: that step's token for
it is dropped.

On CUDA the thread's work goes to a stream of its own at a high priority: ΔW-space merges (a
stream at the lowest, ``merging/merger.py``) yield to it, and the adapter store's blocking
copies, on the legacy default stream, no longer wait behind its steps (that stream waits for
every blocking stream; PyTorch's streams are not blocking ones).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from hotmerge import request_rules as rules
from hotmerge.engine.sampling import RowSampling, Sampler
from hotmerge.engine.scheduler import Admission, StepPlan
from hotmerge.engine.sequence import Sequence
from hotmerge.engine.stats import Lap
from hotmerge.errors import (
    Cancelled,
    DeadlineExceeded,
    HotmergeError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from hotmerge.generation import FinishReason

if TYPE_CHECKING:
    from hotmerge.engine.engine import Engine

log = logging.getLogger(__name__)

# The engine thread's CUDA stream priority (lower runs first; 0 is the lowest and the default):
# above ΔW-space merges, equal to factor-space ones (``merging/merger.py``).
ENGINE_STREAM_PRIORITY = -1


class Worker:
    """The worker thread's loop: schedule -> run -> postprocess -> emit, one step in flight."""

    def __init__(self, engine: Engine) -> None:
        self.runner = engine.runner
        self.scheduler = engine.scheduler
        self.stats = engine.stats
        self._cv = engine._cv
        self.batch_wait_s = engine.config.batch_wait_ms / 1000
        self.arrivals = engine.arrivals
        self.plan_ahead = engine.config.plan_ahead and self.runner.plans_ahead
        self.stopping = False  # set under the condition
        # The step launched and not yet waited on, with its sampling (the runner's Sampler:
        # .wait() -> tokens, logprobs; .tokens on the device).
        self._inflight: tuple[StepPlan, Sampler] | None = None
        self.stream: torch.cuda.Stream | None = None  # the thread's CUDA stream, while it runs

    def run(self) -> None:
        self.stream = _engine_stream(self.runner.device)
        with torch.cuda.stream(self.stream):  # None: a no-op
            self._loop()

    def _loop(self) -> None:
        while True:
            if not self._admit():
                break
            if not self.scheduler.running and self._inflight is None:
                continue
            try:
                self._step()
            except Exception as exc:  # a failed forward fails its batch, never the worker
                with self._cv:  # and those preempted with a token in flight: it is lost
                    lost = [s for s in self.scheduler.waiting if s.pending]
                failing = [*self.scheduler.running, *lost]
                log.exception("engine step failed; failing %d request(s)", len(failing))
                self._inflight = None
                err = HotmergeError(f"internal error while generating: {exc}")
                for seq in failing:
                    self._fail(seq, err)
        shutting = Unavailable("the engine stopped")
        for seq in list(self.scheduler.running):
            self._fail(seq, shutting)
        with self._cv:
            waiting = list(self.scheduler.waiting)
            self.scheduler.waiting.clear()
        for seq in waiting:
            self._fail(seq, shutting)

    def _admit(self) -> bool:
        """Let the scheduler admit queued requests, and write their adapters into their slots;
        False when stopping. An idle engine waits here for work."""
        with self._cv:
            if not self.scheduler.running and self._inflight is None:
                while not self.scheduler.waiting and not self.stopping:
                    self._cv.wait()
                # After the first arrives, wait a little for those on their way, to batch them.
                until = time.monotonic() + self.batch_wait_s
                while (
                    len(self.scheduler.waiting) < self.scheduler.max_batch_size
                    and not self.stopping
                    and self.arrivals.expected()
                    and (left := until - time.monotonic()) > 0
                ):
                    self._cv.wait(left)
            if self.stopping:
                return False
            lap = Lap(self.stats.step_phase_s)  # after the waits: only the work is counted
            admission = self.scheduler.admit(time.monotonic())
        for seq in admission.dropped:
            self._still_wanted(seq)
        if admission.writes:
            self._write_adapters(admission)
        lap("admit")
        return True

    def _write_adapters(self, admission: Admission) -> None:
        """Carry out the admission's slot writes (on the device stream, behind the step in
        flight); a failed write fails the requests that would read that slot."""
        for write in admission.writes:
            try:
                self.runner.adapters.write(write.slot, write.adapter)
            except Exception as exc:
                log.exception("writing an adapter into its slot failed")
                self.scheduler.slots.forget(write.slot)
                err = HotmergeError(f"internal error while loading the adapter: {exc}")
                for seq in admission.admitted:
                    if seq.slot == write.slot:
                        self._fail(seq, err)

    def _still_wanted(self, seq: Sequence) -> bool:
        if seq.handle.cancelled:
            self._fail(seq, Cancelled("cancelled"))
        elif seq.handle.expired():
            self._fail(seq, DeadlineExceeded("deadline exceeded"))
        elif time.monotonic() >= seq.queue_until and seq not in self.scheduler.running:
            self._fail(seq, ResourceExhausted(
                f"waited {rules.MAX_QUEUE_WAIT_S:g} s (the server maximum) in the queue; the "
                "server is busy: retry later or on another replica"
            ))  # fmt: skip
        return not seq.done

    def _step(self) -> None:
        """Launch the next step and take the tokens of the one in flight (planned ahead: launch
        first, then wait; else wait, then launch), then emit the tokens taken while the device
        runs (detokenizing, streaming, stop sequences) and return (admission, too, runs while
        the device works). A sequence its tokens end while it is in the launched step has that
        step's token dropped."""
        self.stats.steps += 1
        lap = Lap(self.stats.step_phase_s)
        waited, self._inflight = self._inflight, None
        for seq in list(self.scheduler.running):  # clients gone or past deadlines: leave now
            self._still_wanted(seq)
        if waited is not None and self.plan_ahead and self.scheduler.can_plan_ahead():
            self._inflight = self._launch(lap, waited[1])
            self.stats.steps_planned_ahead += self._inflight is not None
            tokens, logprobs = self._collect(*waited)
            lap("wait")
        else:
            if waited is not None:
                tokens, logprobs = self._collect(*waited)
                lap("wait")
            self._inflight = self._launch(lap)
        if waited is not None:
            taken = zip(waited[0].sampled, tokens, logprobs, strict=True)
            for seq, token, logprob in taken:
                try:
                    self._emit(seq, token, logprob)
                except Exception as exc:  # one request's failure is that request's alone
                    log.exception("request failed while emitting a token")
                    self._fail(seq, HotmergeError(f"internal error while generating: {exc}"))
            lap("emit")

    def _launch(self, lap: Lap, previous: Sampler | None = None) -> tuple[StepPlan, Sampler] | None:
        """Queue the scheduled step: decode, prompt chunks and the sampling of every sequence
        that gets a token; nothing waits for the device here. ``previous``: the sampling of
        the step in flight (planned ahead), whose tokens its rows read on the device."""
        plan = self.scheduler.schedule()
        if plan is None:
            return None
        tokens = previous.tokens if previous is not None else None
        decode_logits = prefill_logits = None
        now = time.perf_counter()
        if plan.decode:
            lap("prepare")
            decode_logits = self.runner.decode(plan.decode, tokens)
            self.stats.decode_batch_sizes[len(plan.decode)] += 1
            lap("decode")
        if plan.chunks:
            for seq in plan.chunk_seqs:
                if not seq.prefill_started:
                    seq.prefill_started = now
                    # Everything before prefill but the load and merge: timings add up to total.
                    t = seq.timings
                    t.queue_ms = max(
                        0.0, (now - seq.submitted) * 1000.0 - t.adapter_load_ms - t.merge_ms
                    )
            prefill_logits, scores = self.runner.prefill(plan.chunks, tokens)
            self.stats.prefill_batch_sizes[len(plan.chunks)] += 1
            if plan.decode_chunks:
                self.stats.mixed_decode_rows[plan.decode_chunks] += 1
            for seq, score in zip(plan.chunk_seqs, scores, strict=True):
                seq.prompt_scores.extend(score)
            lap("prefill")
        # A decode row's input token, still on the device when planned ahead: seen too.
        fed = [r.prev for r in plan.decode] or [c.prev for c in plan.chunks[: plan.decode_chunks]]
        sampling = []
        for i, s in enumerate(plan.sampled):
            penalised = s.params.repetition_penalty != 1.0
            sampling.append(
                RowSampling(
                    s.params,
                    s.seed,
                    len(s.generated) + s.pending - 1,  # its own token is pending now too
                    s.prompt_ids + s.generated if penalised else (),
                    fed[i] if penalised and i < len(fed) else -1,
                )
            )
        lap("prepare")
        sampler = self.runner.sample([decode_logits, prefill_logits], sampling, tokens)
        lap("sample")
        return plan, sampler

    def _collect(self, plan: StepPlan, sampler: Sampler) -> tuple[list[int], list[float]]:
        """The launched step's tokens and logprobs, once on the host, handed to the scheduler."""
        tokens, logprobs = sampler.wait()
        for i, reason in sampler.failed.items():  # that sequence alone, never the batch
            self._fail(plan.sampled[i], InvalidArgument(f"parameters: {reason}"))
        done = time.perf_counter()
        for seq, chunk in plan.prompt_chunks():
            if chunk.start + len(chunk.token_ids) == seq.prefill_end and not seq.prefill_done:
                seq.prefill_done = done
                seq.timings.prefill_ms = (done - seq.prefill_started) * 1000.0
        for seq in self.scheduler.postprocess(plan, tokens):
            self._finish(seq, FinishReason.LENGTH)  # prompt scoring only: nothing to generate
        return tokens, logprobs

    # -- output -----------------------------------------------------------------------------

    def _emit(self, seq: Sequence, token: int, logprob: float) -> None:
        """Stream a taken token and finish the request if it ends with it."""
        if seq.done:
            return
        finish = seq.push(token, logprob)
        if finish is not None:
            self._finish(seq, finish)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        result = seq.result(reason, self.runner.tokenizer.decode)
        self._end(seq)
        self.stats.requests_finished += 1
        t = seq.timings
        log.debug(
            "request done: adapter=%s prompt=%d generated=%d finish=%s queue=%.1fms "
            "prefill=%.1fms decode=%.1fms total=%.1fms",
            seq.lease.name,
            len(seq.prompt_ids),
            len(seq.generated),
            reason.value,
            t.queue_ms,
            t.prefill_ms,
            t.decode_ms,
            t.total_ms,
        )
        seq.handle._put(result)

    def _fail(self, seq: Sequence, error: HotmergeError) -> None:
        if seq.done:
            return
        self._end(seq)
        self.stats.requests_failed += 1
        log.debug("request failed: %s", error)
        seq.handle._put(error)

    def _end(self, seq: Sequence) -> None:
        """Give back everything the request holds: blocks, reservation, slot, cache, adapter."""
        if self.scheduler.finish(seq):
            self.runner.release(seq.seq_id)
        seq.lease.release()


def _engine_stream(device: torch.device) -> torch.cuda.Stream | None:
    """The engine thread's CUDA stream, above the ΔW-space merges' priority 0 (None off CUDA)."""
    if device.type != "cuda":
        return None
    return torch.cuda.Stream(device, priority=ENGINE_STREAM_PRIORITY)
