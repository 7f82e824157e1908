"""The scheduler: who runs, in which slot, on which KV blocks. Pure policy: no threads, no
waits, no device calls; the engine calls it on its worker thread and carries out its plans.

Admission (:meth:`Scheduler.admit`): queued sequences cancelled or past their deadline or
queue wait leave; then, first come first served, sequences join the batch while it has room,
the KV cache can hold their worst case (prompt + max_new_tokens, reserved, taken block by block
as tokens come) and an adapter slot is free or already holds their adapter. A sequence whose
adapter is not in its slot comes with an :class:`AdapterWrite` for the runner.

Each step (:meth:`Scheduler.schedule`): one decode row per generating sequence, and up to
``max_prefill_tokens`` of prompt for the sequences still prefilling (long prompts go in chunks,
so a new prompt never stalls the running rows for long). :meth:`Scheduler.postprocess` gives
each sampled sequence its token and marks those it ends (EOS, length); a stop sequence shows
only once the engine detokenizes. :meth:`Scheduler.finish` gives a sequence's blocks and slot
back at once (continuous batching).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from hotmerge_kernels.layout import FlatAdapter

from hotmerge.engine.batch import DecodeRow, PrefillChunk
from hotmerge.engine.kv_cache import KVBlockPool, blocks_for
from hotmerge.engine.sequence import Sequence
from hotmerge.engine.slots import SlotTable
from hotmerge.generation import FinishReason


@dataclass(frozen=True)
class AdapterWrite:
    """Write ``adapter`` into device slot ``slot`` before the sequences reading it run."""

    slot: int
    adapter: FlatAdapter


@dataclass
class Admission:
    dropped: list[Sequence]  # left the queue: cancelled, past their deadline or queue wait
    admitted: list[Sequence]  # joined the batch, blocks reserved and slot assigned
    writes: list[AdapterWrite]  # adapters the admitted sequences need written into slots


@dataclass(eq=False)
class StepPlan:
    """One step: decode rows, prompt chunks, and the sequences that get a token from it (in
    the order of the logits: the decoding ones, then those whose prompt ends in this step)."""

    decode: list[DecodeRow]
    chunks: list[PrefillChunk]
    chunk_seqs: list[Sequence]  # the sequence of each chunk
    sampled: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        kv: KVBlockPool,
        slots: SlotTable,
        *,
        max_batch_size: int,
        max_prefill_tokens: int,
        max_total_tokens: int,
        eos_token_ids: Collection[int],
    ) -> None:
        self.kv = kv
        self.slots = slots
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_total_tokens = max_total_tokens
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admitted, in admission order

    def add(self, seq: Sequence) -> None:
        """Queue a sequence (the engine calls this from request threads, and ``admit`` from
        its worker, both holding its lock; everything else runs on the worker only)."""
        self.waiting.append(seq)

    def admit(self, now: float) -> Admission:
        """Drop queued sequences no longer wanted (``now``: time.monotonic()), then move
        queued ones into the batch while they fit."""
        dropped = [
            s
            for s in self.waiting
            if s.handle.cancelled or s.handle.expired(now) or now >= s.queue_until
        ]
        for seq in dropped:
            self.waiting.remove(seq)
        admitted, writes = [], []
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            blocks = blocks_for(seq.worst_tokens, self.kv.block_size)
            weights = seq.lease.weights
            if not self.kv.can_reserve(blocks) or (
                weights is not None and not self.slots.can_take(weights)
            ):
                break  # first come, first served: wait for room rather than skip ahead
            self.waiting.popleft()
            self.kv.reserve(blocks)
            seq.reserved = blocks
            if weights is not None:
                seq.slot, fresh = self.slots.take(weights)
                if fresh:
                    writes.append(AdapterWrite(seq.slot, weights))
            self.running.append(seq)
            admitted.append(seq)
        return Admission(dropped, admitted, writes)

    def schedule(self) -> StepPlan | None:
        """The next step's decode rows and prompt chunks (None: nothing to run)."""
        sampled = [s for s in self.running if not s.prefilling and s.ending is None]
        decode = []
        for s in sampled:
            position = len(s.prompt_ids) + len(s.generated) - 1
            self._grow(s, position + 1)
            decode.append(DecodeRow(s.seq_id, s.generated[-1], position, s.blocks, s.slot))
        chunks, chunk_seqs = self._prefill_chunks()
        if chunks:
            sampled.extend(s for s, c in zip(chunk_seqs, chunks, strict=True) if c.last)
        elif not decode:
            return None
        return StepPlan(decode, chunks, chunk_seqs, sampled)

    def _prefill_chunks(self) -> tuple[list[PrefillChunk], list[Sequence]]:
        """The next prompt chunks, up to ``max_prefill_tokens`` (at least one chunk); each
        sequence's prompt counts as in the cache from here."""
        budget = self.max_prefill_tokens
        chunks, seqs = [], []
        for s in self.running:
            if not s.prefilling or (budget <= 0 and chunks):
                continue
            start = s.prefilled
            end = min(len(s.prompt_ids), start + max(budget, 1))
            budget -= end - start
            self._grow(s, end)
            final = end == len(s.prompt_ids)
            chunks.append(
                PrefillChunk(
                    seq_id=s.seq_id,
                    token_ids=s.prompt_ids[start:end],
                    start=start,
                    block_table=s.blocks,
                    slot=s.slot,
                    last=final and s.params.max_new_tokens > 0,
                    score=s.params.prompt_logprobs,
                    next_token=None if final else s.prompt_ids[end],
                )
            )
            s.prefilled = end
            seqs.append(s)
        return chunks, seqs

    def _grow(self, seq: Sequence, tokens: int) -> None:
        """Make sure the sequence's blocks cover its first ``tokens`` positions."""
        missing = blocks_for(tokens, self.kv.block_size) - len(seq.blocks)
        if missing > 0:
            seq.blocks.extend(self.kv.take(missing))
            seq.reserved -= missing

    def postprocess(self, plan: StepPlan, tokens: list[int]) -> Iterable[Sequence]:
        """The step's tokens, taken by their sequences (those ended meanwhile take nothing):
        what the next step feeds them, and whether it ends them (``ending``: EOS, length).
        Returns the sequences the step finished without a token: prompt scoring only
        (max_new_tokens 0) whose prompt is now all in."""
        for seq, token in zip(plan.sampled, tokens, strict=True):
            if seq.done:
                continue
            seq.generated.append(token)
            if token in self.eos_token_ids:
                seq.ending = FinishReason.EOS
            elif (
                len(seq.generated) >= seq.params.max_new_tokens
                or len(seq.prompt_ids) + len(seq.generated) >= self.max_total_tokens
            ):
                seq.ending = FinishReason.LENGTH
        if not plan.chunk_seqs:
            return ()
        return [
            s
            for s in plan.chunk_seqs
            if not s.prefilling and not s.done and s.params.max_new_tokens == 0
        ]

    def finish(self, seq: Sequence) -> bool:
        """Give back the sequence's blocks, reservation and slot; True if it was running
        (False: it was still queued, or already finished)."""
        seq.done = True
        if seq not in self.running:
            return False
        self.running.remove(seq)
        self.kv.release(seq.blocks, seq.reserved)
        seq.blocks, seq.reserved = [], 0
        if seq.slot >= 0:
            self.slots.release(seq.slot)
            seq.slot = -1
        return True
