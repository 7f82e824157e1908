"""The scheduler: who runs, in which slot, on which KV blocks. Pure policy: no threads, no
waits, no device calls; the engine calls it on its worker thread and carries out its plans.

Admission (:meth:`Scheduler.admit`): queued sequences cancelled or past their deadline or
queue wait leave; then, first come first served, sequences join the batch while it has room,
the KV cache has blocks for their prompt now (admission by need: later tokens take blocks as
they come) and an adapter slot is free or already holds their adapter. Blocks whose KV another
sequence already computed for the same tokens and adapter are reused (prefix caching,
:mod:`~hotmerge.engine.block_manager`): prefill starts after them. A sequence whose adapter is
not in its slot comes with an :class:`AdapterWrite` for the runner.

Each step (:meth:`Scheduler.schedule`): one decode row per generating sequence, and up to
``max_prefill_tokens`` of prompt for the sequences still prefilling (long prompts go in chunks,
so a new prompt never stalls the running rows for long). With prompts to prefill, the decode
rows go into the same forward as one-token chunks (a mixed step: the weights are read once for
both; their tokens count against the budget); decode-only steps keep the decode path. A decode
row that needs a block when none is free preempts the most recently admitted rows: their blocks
are freed and they go back to the front of the queue, to re-prefill their prompt and generated
tokens later (recompute; their cached blocks often survive) and go on without repeating a token.
:meth:`Scheduler.postprocess` gives each sampled sequence its token, marks those it ends (EOS,
length) and registers the blocks the step filled for reuse; a stop sequence shows only once
the engine detokenizes. :meth:`Scheduler.finish` gives a sequence's blocks and slot back at
once (continuous batching).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from hotmerge_kernels.layout import FlatAdapter

from hotmerge.engine.batch import DecodeRow, PrefillChunk
from hotmerge.engine.block_manager import BlockManager, RowUse, preemption_victims
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
    admitted: list[Sequence]  # joined the batch, prompt blocks taken and slot assigned
    writes: list[AdapterWrite]  # adapters the admitted sequences need written into slots


@dataclass(eq=False)
class StepPlan:
    """One step: decode rows, prompt chunks, and the sequences that get a token from it (in
    the order of the logits: the decoding ones, then those whose prompt ends in this step).
    A mixed step has no decode rows: they come as one-token chunks before the prompts', so
    one forward reads the weights once for both."""

    decode: list[DecodeRow]
    chunks: list[PrefillChunk]
    chunk_seqs: list[Sequence]  # the sequence of each chunk
    sampled: list[Sequence] = field(default_factory=list)
    # Decode rows whose token fills their last block (registered for reuse after the step).
    filling: list[Sequence] = field(default_factory=list)
    decode_chunks: int = 0  # the first chunks that are decode rows (a mixed step)

    def prompt_chunks(self) -> list[tuple[Sequence, PrefillChunk]]:
        """(sequence, chunk) of each prompt chunk (a mixed step's decode rows left out)."""
        n = self.decode_chunks
        return list(zip(self.chunk_seqs[n:], self.chunks[n:], strict=True))


class Scheduler:
    def __init__(
        self,
        kv: BlockManager,
        slots: SlotTable,
        *,
        max_batch_size: int,
        max_prefill_tokens: int,
        max_total_tokens: int,
        eos_token_ids: Collection[int],
        mixed_steps: bool = True,
    ) -> None:
        self.kv = kv
        self.slots = slots
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_total_tokens = max_total_tokens
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admitted, in admission order
        self.mixed_steps = mixed_steps  # decode rows and prompt chunks in one forward
        self.preemptions = 0
        self.mixed_plans = 0
        self._order = itertools.count()

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
            if s.done  # preempted, then ended by a stop sequence in its last token
            or s.handle.cancelled
            or s.handle.expired(now)
            or now >= s.queue_until
        ]
        for seq in dropped:
            self.waiting.remove(seq)
        admitted, writes = [], []
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            weights = seq.lease.weights
            if weights is not None and not self.slots.can_take(weights):
                break  # first come, first served: wait for room rather than skip ahead
            # A prompt to score is computed whole: a cached prefix would have no scores.
            scoring = seq.params.prompt_logprobs and not seq.resumed
            table = self.kv.allocate(seq.tokens(0, seq.prefill_end), seq.kv_key, lookup=not scoring)
            if table is None:
                break
            self.waiting.popleft()
            seq.table, seq.prefilled = table, table.cached_tokens
            seq.admitted_order = next(self._order)
            if weights is not None:
                seq.slot, fresh = self.slots.take(weights)
                if fresh:
                    writes.append(AdapterWrite(seq.slot, weights))
            self.running.append(seq)
            admitted.append(seq)
        return Admission(dropped, admitted, writes)

    def can_plan_ahead(self) -> bool:
        """Whether the next step can be planned before the step in flight's tokens are on the
        host: a free block for every row that enters a new one (no preemption, which would
        recompute from tokens the host does not have)."""
        entering = sum(
            self._enters_block(s, _input_position(s))
            for s in self.running
            if s.table is not None and self._decodes(s)
        )
        return entering <= self.kv.free_blocks

    def schedule(self) -> StepPlan | None:
        """The next step's decode rows and prompt chunks (None: nothing to run), launched at
        once (its sampled sequences' tokens are pending until ``postprocess``); rows that must
        make room for others' tokens are preempted first. Planned ahead (a step in flight), a
        row whose token is still on the device reads it there (``prev``), and one that this
        token ends by its length is left out."""
        decoding = [s for s in self.running if self._decodes(s)]
        preempted: list[Sequence] = []
        size = self.kv.block_size
        rows, filling = [], []  # the block manager sees a row only at a block boundary
        for s in decoding:
            table = s.table
            if table is None:  # preempted for an earlier row
                continue
            position = _input_position(s)
            if self._enters_block(s, position):
                self._grow(s, position + 1, preempted)
                if s.table is None:
                    continue
            elif position % size == size - 1:
                filling.append(s)
            if s.pending:
                rows.append(DecodeRow(s.seq_id, 0, position, table.blocks, s.slot, s.pending_index))
            else:
                rows.append(DecodeRow(s.seq_id, s.generated[-1], position, table.blocks, s.slot))
        if preempted:  # rows made room for later ones: those gone leave the step
            gone = {v.seq_id for v in preempted}
            rows = [r for r in rows if r.seq_id not in gone]
            decoding = [s for s in decoding if s.table is not None]
            filling = [s for s in filling if s.table is not None]
        mixing = self.mixed_steps and 0 < len(rows) < self.max_prefill_tokens
        chunks, chunk_seqs = self._prefill_chunks(
            self.max_prefill_tokens - len(rows) if mixing else self.max_prefill_tokens
        )
        if not chunks:
            return _pending(StepPlan(rows, [], [], decoding, filling)) if rows else None
        sampled = decoding + [s for s, c in zip(chunk_seqs, chunks, strict=True) if c.last]
        if mixing:  # one forward: each decode row is a one-token chunk, first (logits order)
            self.mixed_plans += 1
            chunks[:0] = [
                PrefillChunk(
                    seq_id=r.seq_id,
                    token_ids=[r.token_id],
                    start=r.position,
                    block_table=r.block_table,
                    slot=r.slot,
                    last=True,
                    prev=r.prev,
                )
                for r in rows
            ]
            chunk_seqs[:0] = decoding
            return _pending(StepPlan([], chunks, chunk_seqs, sampled, filling, len(rows)))
        return _pending(StepPlan(rows, chunks, chunk_seqs, sampled, filling))

    def _enters_block(self, seq: Sequence, position: int) -> bool:
        """Whether a decode row at ``position`` needs a block its table does not have yet."""
        size = self.kv.block_size
        return position % size == 0 and position >= len(seq.table.blocks) * size

    def _decodes(self, seq: Sequence) -> bool:
        """Whether the sequence gets a decode row: prompt all in, a token to feed (a prompt
        only scored has none), not ending, and not ended by the length its tokens in flight
        reach."""
        produced = len(seq.generated) + seq.pending
        if seq.prefilling or seq.ending is not None or not produced:
            return False
        return not seq.pending or (
            produced < seq.params.max_new_tokens
            and len(seq.prompt_ids) + produced < self.max_total_tokens
        )

    def _prefill_chunks(self, budget: int) -> tuple[list[PrefillChunk], list[Sequence]]:
        """The next prefill chunks, up to ``budget`` tokens (at least one chunk); each
        sequence's tokens count as in the cache from here (their blocks came at admission)."""
        chunks, seqs = [], []
        for s in self.running:
            if not s.prefilling or (budget <= 0 and chunks):
                continue
            start = s.prefilled
            end = min(s.prefill_end, start + max(budget, 1))
            budget -= end - start
            final = end == s.prefill_end
            resumed = s.resumed  # its first token came before: the next step decodes
            chunks.append(
                PrefillChunk(
                    seq_id=s.seq_id,
                    token_ids=s.tokens(start, end),
                    start=start,
                    block_table=s.table.blocks,
                    slot=s.slot,
                    last=final and s.params.max_new_tokens > 0 and not resumed,
                    score=s.params.prompt_logprobs and not resumed,
                    next_token=None if final else s.tokens(end, end + 1)[0],
                )
            )
            s.prefilled = end
            seqs.append(s)
        return chunks, seqs

    def _grow(self, seq: Sequence, tokens: int, preempted: list[Sequence]) -> None:
        """Make the sequence's blocks cover its first ``tokens`` positions, preempting the
        most recently admitted rows while the pool has none (``seq`` itself, if it is the
        latest: it then waits in the queue)."""
        while not self.kv.grow(seq.table, tokens):
            uses = [
                RowUse(s, s.admitted_order, self.kv.freeable(s.table))
                for s in self.running
                if s.ending is None or s is seq  # ending rows free theirs this step anyway
            ]
            for victim in preemption_victims(uses, 1, needing=seq):
                self._preempt(victim)
                preempted.append(victim)
            if seq.table is None:
                return

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and slot and queue it first, to recompute its KV:
        its prompt and every generated token but the last, which the next decode feeds."""
        self._leave(seq)
        produced = len(seq.generated) + seq.pending  # a token in flight comes before it resumes
        if produced:
            seq.prefill_end = len(seq.prompt_ids) + produced - 1
        else:
            seq.prompt_scores.clear()  # scored again from the start
        seq.prefilled = 0
        seq.preemptions += 1
        self.preemptions += 1
        seq.queue_until = math.inf  # bounded by its deadline; it was admitted once
        self.waiting.appendleft(seq)

    def postprocess(self, plan: StepPlan, tokens: list[int]) -> Iterable[Sequence]:
        """The step's tokens, taken by their sequences (those ended meanwhile take nothing):
        what the next step feeds them, and whether it ends them (``ending``: EOS, length).
        Returns the sequences the step finished without a token: prompt scoring only
        (max_new_tokens 0) whose prompt is now all in."""
        for seq in plan.filling:
            self._commit(seq, len(seq.prompt_ids) + len(seq.generated))  # its token not in yet
        prompts = plan.prompt_chunks()
        for seq, chunk in prompts:  # what this step computed (a step planned since: more)
            self._commit(seq, chunk.start + len(chunk.token_ids))
        for seq, token in zip(plan.sampled, tokens, strict=True):
            seq.pending -= 1
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
        return [
            s
            for s, chunk in prompts
            if chunk.start + len(chunk.token_ids) == s.prefill_end
            and not s.done
            and s.params.max_new_tokens == 0
        ]

    def _commit(self, seq: Sequence, computed: int) -> None:
        """Register the full blocks among the first ``computed`` tokens (the step wrote their
        KV) for reuse; none for a sequence that ended meanwhile."""
        if seq.table is not None and not seq.done:
            self.kv.commit(seq.table, _Tokens(seq), computed)

    def finish(self, seq: Sequence) -> bool:
        """Give back the sequence's blocks and slot; True if it was running (False: it was
        still queued, or already finished)."""
        seq.done = True
        if seq not in self.running:
            return False
        self._leave(seq)
        return True

    def _leave(self, seq: Sequence) -> None:
        """Take a running sequence out of the batch: its blocks and slot go back."""
        self.running.remove(seq)
        self.kv.release(seq.table)
        seq.table = None
        if seq.slot >= 0:
            self.slots.release(seq.slot)
            seq.slot = -1


def _input_position(seq: Sequence) -> int:
    """The position of a decoding sequence's next input token: its last, the host's or one in
    flight."""
    return len(seq.prompt_ids) + len(seq.generated) + seq.pending - 1


def _pending(plan: StepPlan) -> StepPlan:
    """The plan is launched as soon as it is made: each sampled sequence then has a token on
    the device that the host has not (until ``postprocess``)."""
    for i, seq in enumerate(plan.sampled):
        seq.pending += 1
        seq.pending_index = i
    return plan


class _Tokens:
    """A sequence's tokens as the block manager slices them, without joining its lists."""

    __slots__ = ("seq",)

    def __init__(self, seq: Sequence) -> None:
        self.seq = seq

    def __getitem__(self, part: slice) -> list[int]:
        return self.seq.tokens(part.start, part.stop)
