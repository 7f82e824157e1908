"""The scheduler's policy on its own: no runner, no model, no thread.

Admission order and batch size, KV reservation, adapter slots (assignment, sharing, eviction,
writes), prompt chunking, tokens and finishing, and the queue's expiry rules.
"""

from __future__ import annotations

import itertools

import pytest
from hotmerge.engine.block_manager import BlockManager
from hotmerge.engine.detok import TextStream
from hotmerge.engine.requests import AdapterLease, GenerationHandle
from hotmerge.engine.scheduler import AdapterWrite, Scheduler
from hotmerge.engine.sequence import Sequence
from hotmerge.engine.slots import SlotTable
from hotmerge.generation import FinishReason, GenerationRequest, SamplingParams

EOS = 2
BLOCK = 4
_ids = itertools.count()


class Adapter:
    """Stands in for a FlatAdapter: the scheduler only keeps (weak) references to it."""


def sequence(prompt_len=5, max_new_tokens=4, adapter=None, *, deadline=None, queue_until=1e9,
             **params) -> Sequence:  # fmt: skip
    prompt = list(range(10, 10 + prompt_len))
    params = SamplingParams(max_new_tokens=max_new_tokens, **params)
    request = GenerationRequest(input_ids=tuple(prompt), params=params)
    return Sequence(
        seq_id=next(_ids),
        handle=GenerationHandle(request, deadline),
        prompt_ids=prompt,
        lease=AdapterLease(adapter),
        stream=TextStream(lambda ids: "", prompt, ()),
        seed=0,
        submitted=0.0,
        queued=0.0,
        queue_until=queue_until,
    )


def scheduler(
    *, blocks=64, slots=2, batch=4, prefill=64, total=256, caching=True, mixed=True
) -> Scheduler:
    return Scheduler(
        BlockManager(blocks + 1, BLOCK, prefix_caching=caching),  # + the null block
        SlotTable(slots),
        max_batch_size=batch,
        max_prefill_tokens=prefill,
        max_total_tokens=total,
        eos_token_ids=frozenset({EOS}),
        mixed_steps=mixed,
    )


def add(sched: Scheduler, *seqs: Sequence) -> None:
    for s in seqs:
        sched.add(s)


def step(sched: Scheduler, token: int = 7):
    """Plan a step and give every sampled sequence ``token``."""
    plan = sched.schedule()
    assert plan is not None
    return plan, sched.postprocess(plan, [token] * len(plan.sampled))


def test_admission_is_first_come_first_served_up_to_the_batch_size():
    sched = scheduler(batch=2)
    a, b, c = sequence(), sequence(), sequence()
    add(sched, a, b, c)
    admission = sched.admit(now=0.0)
    assert admission.admitted == [a, b] and list(sched.waiting) == [c]
    assert sched.admit(now=0.0).admitted == []  # the batch is full
    assert sched.finish(a) and not sched.finish(a)  # ends once
    assert sched.admit(now=0.0).admitted == [c] and sched.running == [b, c]


def test_admission_takes_the_prompts_blocks_and_a_big_request_is_not_overtaken():
    sched = scheduler(blocks=6)
    big, first, small = sequence(16, 4), sequence(12, 4), sequence(2, 2)  # 4, 3, 1 blocks
    add(sched, big, first, small)
    assert sched.admit(now=0.0).admitted == [big]  # by need: its prompt's 4 blocks only
    assert len(big.table.blocks) == 4 and sched.kv.free_blocks == 2
    assert sched.admit(now=0.0).admitted == []  # ``first`` waits, and ``small`` behind it
    step(sched)  # the prompt is in; its first token's block comes when it is decoded
    assert len(big.table.blocks) == 4
    step(sched)
    assert len(big.table.blocks) == 5 and sched.kv.free_blocks == 1
    sched.finish(big)
    assert sched.kv.free_blocks == 6 and big.table is None
    assert sched.admit(now=0.0).admitted == [first, small]


def test_adapter_slots_are_shared_written_once_and_evicted_least_recently_used():
    sched = scheduler(slots=2)
    x, y, z = Adapter(), Adapter(), Adapter()
    sx1, sx2, sy, sz = (
        sequence(adapter=x),
        sequence(adapter=x),
        sequence(adapter=y),
        sequence(adapter=z),
    )
    base = sequence()
    add(sched, sx1, sx2, sy, sz, base)
    admission = sched.admit(now=0.0)
    assert admission.admitted == [sx1, sx2, sy]  # z waits for a slot, and base behind it
    assert sx1.slot == sx2.slot != sy.slot
    x_slot = sx1.slot
    assert admission.writes == [AdapterWrite(sx1.slot, x), AdapterWrite(sy.slot, y)]
    sched.finish(sx1)
    assert sched.admit(now=0.0).admitted == []  # x's slot is still read by sx2
    sched.finish(sy)
    admission = sched.admit(now=0.0)
    assert admission.admitted == [sz, base] and base.slot == -1
    assert admission.writes == [AdapterWrite(sz.slot, z)] and sz.slot != x_slot
    sched.finish(sx2)
    again = sequence(adapter=x)
    add(sched, again)
    admission = sched.admit(now=0.0)
    assert admission.writes == [] and again.slot == x_slot  # x is still in its idle slot


def test_evicted_adapter_is_written_again():
    sched = scheduler(slots=1)
    x, y = Adapter(), Adapter()
    for adapter in (x, y, x):
        seq = sequence(adapter=adapter)
        add(sched, seq)
        assert sched.admit(now=0.0).writes == [AdapterWrite(0, adapter)]
        sched.finish(seq)


def test_prompts_go_in_chunks_within_the_prefill_budget():
    sched = scheduler(prefill=5)
    long, short = sequence(7, 2), sequence(3, 2)
    add(sched, long, short)
    sched.admit(now=0.0)
    plan, _ = step(sched)
    assert [(c.seq_id, c.start, len(c.token_ids)) for c in plan.chunks] == [(long.seq_id, 0, 5)]
    assert not plan.chunks[0].last and plan.chunks[0].next_token == long.prompt_ids[5]
    assert plan.decode == [] and plan.sampled == [] and long.prefilling
    plan, _ = step(sched, token=8)
    assert [(c.seq_id, c.start, len(c.token_ids)) for c in plan.chunks] == [
        (long.seq_id, 5, 2),
        (short.seq_id, 0, 3),
    ]
    assert all(c.last for c in plan.chunks) and plan.sampled == [long, short]
    assert long.generated == short.generated == [8]
    plan, _ = step(sched)
    assert plan.chunks == [] and [r.seq_id for r in plan.decode] == [long.seq_id, short.seq_id]
    assert [(r.token_id, r.position) for r in plan.decode] == [(8, 7), (8, 3)]


def test_one_chunk_always_runs_even_over_the_budget():
    sched = scheduler(prefill=1)
    a, b = sequence(3, 1), sequence(3, 1)
    add(sched, a, b)
    sched.admit(now=0.0)
    plan, _ = step(sched)
    assert [c.seq_id for c in plan.chunks] == [a.seq_id] and len(plan.chunks[0].token_ids) == 1


def test_tokens_end_sequences_by_length_eos_and_total():
    sched = scheduler(total=8)
    by_length, by_eos, by_total = sequence(3, 2), sequence(3, 5), sequence(6, 5)
    add(sched, by_length, by_eos, by_total)
    sched.admit(now=0.0)
    step(sched)  # prefill: each takes its first token
    assert by_length.ending is None and by_eos.ending is None and by_total.ending is None
    plan = sched.schedule()
    sched.postprocess(plan, [7, EOS, 7])
    assert by_length.ending is FinishReason.LENGTH  # 2 of max_new_tokens 2
    assert by_eos.ending is FinishReason.EOS
    assert by_total.ending is FinishReason.LENGTH  # 6 + 2 tokens = max_total_tokens
    assert sched.schedule() is None  # all ending: nothing to decode
    for seq in (by_length, by_eos, by_total):
        sched.finish(seq)
    assert sched.running == [] and sched.kv.free_blocks == sched.kv.capacity_blocks


def test_finished_sequence_takes_no_token_and_gives_its_slot_back():
    sched = scheduler(slots=1)
    x = Adapter()
    seq = sequence(adapter=x)
    add(sched, seq)
    sched.admit(now=0.0)
    plan = sched.schedule()
    sched.finish(seq)  # e.g. cancelled while its step ran
    assert sched.postprocess(plan, [7]) == [] and seq.generated == []
    assert seq.slot == -1 and sched.slots.in_use == 0


def test_prompt_scoring_only_finishes_when_its_prompt_is_in():
    sched = scheduler(prefill=4)
    scored = sequence(6, 0, prompt_logprobs=True)
    add(sched, scored)
    sched.admit(now=0.0)
    plan, done = step(sched)
    assert done == [] and plan.sampled == []
    plan, done = step(sched)
    assert done == [scored] and plan.chunks[0].last is False and plan.chunks[0].score


@pytest.mark.parametrize("why", ["cancelled", "deadline", "queue wait"])
def test_queued_sequences_no_longer_wanted_are_dropped(why):
    sched = scheduler()
    seq = {
        "cancelled": sequence(),
        "deadline": sequence(deadline=5.0),
        "queue wait": sequence(queue_until=5.0),
    }[why]
    if why == "cancelled":
        seq.handle.cancel()
    kept = sequence()
    add(sched, seq, kept)
    admission = sched.admit(now=10.0)
    assert admission.dropped == [seq] and admission.admitted == [kept]
    assert not sched.finish(seq) and seq.done  # it was never running: nothing to give back


def test_a_cached_prefix_is_shared_and_its_prefill_skipped():
    sched = scheduler()
    first = sequence(10, 4)  # blocks of 4: two full blocks, then 2 tokens
    add(sched, first)
    sched.admit(now=0.0)
    step(sched)  # prefilled and committed
    same, other = sequence(10, 4), sequence(10, 4, adapter=Adapter())
    other.kv_key = ("object", 1)  # KV computed with an adapter is never the base's
    add(sched, same, other)
    sched.admit(now=0.0)
    assert same.prefilled == 8 and same.table.blocks[:2] == first.table.blocks[:2]
    assert other.prefilled == 0 and not set(other.table.blocks) & set(first.table.blocks)
    plan = sched.schedule()
    prompts = plan.chunks[plan.decode_chunks :]  # after ``first``'s decode row (mixed step)
    assert [(c.start, len(c.token_ids)) for c in prompts] == [(8, 2), (0, 10)]
    for seq in (first, same, other):
        sched.finish(seq)
    assert sched.kv.free_blocks == sched.kv.capacity_blocks and sched.kv.hits == 8


def test_a_prompt_to_score_is_computed_whole():
    sched = scheduler()
    first, scored = sequence(10, 4), sequence(10, 4, prompt_logprobs=True)
    add(sched, first)
    sched.admit(now=0.0)
    step(sched)
    add(sched, scored)
    sched.admit(now=0.0)
    assert scored.prefilled == 0 and sched.kv.hits == 0
    plan = sched.schedule()
    assert plan.chunks[plan.decode_chunks].start == 0 and plan.chunks[plan.decode_chunks].score


def test_the_latest_admitted_row_is_preempted_and_resumes_where_it_was():
    sched = scheduler(blocks=6, caching=False)
    old, new = sequence(7, 8), sequence(7, 8)  # 2 blocks each at admission
    add(sched, old, new)
    sched.admit(now=0.0)
    step(sched, 20)  # prompts in: positions 0-6, first tokens sampled
    step(sched, 21)  # position 7 (old: 2 blocks; new: 2) ...
    step(sched, 22)  # position 8: each takes a 3rd block: 6 of 6 used
    assert sched.kv.free_blocks == 0 and old.generated == new.generated == [20, 21, 22]
    for token in (23, 24, 25):  # positions 9-11 fit the 3rd block
        step(sched, token)
    plan = sched.schedule()  # position 12: old needs a 4th block, and ``new`` makes room
    assert [r.seq_id for r in plan.decode] == [old.seq_id] and plan.chunks == []
    assert sched.running == [old] and list(sched.waiting) == [new] and new.table is None
    assert new.prefill_end == 7 + 6 - 1 and new.prefilled == 0 and sched.preemptions == 1
    sched.postprocess(plan, [26])
    sched.finish(old)
    sched.admit(now=0.0)  # back first, its queue wait no obstacle
    plan = sched.schedule()  # recompute: the prompt and every token but the last
    chunk = plan.chunks[0]
    assert chunk.token_ids == [*range(10, 17), 20, 21, 22, 23, 24] and chunk.start == 0
    assert not chunk.last and not chunk.score and plan.sampled == []
    sched.postprocess(plan, [])
    plan = sched.schedule()  # then decoding goes on from its last token: nothing repeated
    assert [(r.token_id, r.position) for r in plan.decode] == [(25, 12)]
    sched.postprocess(plan, [26])
    assert new.generated == [20, 21, 22, 23, 24, 25, 26]
    sched.finish(new)
    assert sched.kv.free_blocks == sched.kv.capacity_blocks


def test_a_row_preempts_itself_when_it_is_the_latest():
    sched = scheduler(blocks=4, caching=False)
    old, new = sequence(7, 8), sequence(3, 8)  # 2 blocks, 1 block
    add(sched, old, new)
    sched.admit(now=0.0)
    step(sched)  # prompts in
    step(sched)  # old at position 7 (2nd block), new at 3 (1st block)
    plan = sched.schedule()  # old: a 3rd block (the last free); new: a 2nd, none left
    assert [r.seq_id for r in plan.decode] == [old.seq_id]
    assert list(sched.waiting) == [new] and sched.kv.free_blocks == 1  # new's block back


@pytest.mark.parametrize("mixed", [True, False])
def test_a_mixed_step_puts_decode_rows_first_as_one_token_chunks(mixed):
    sched = scheduler(prefill=8, mixed=mixed, caching=False)
    running, late = sequence(5, 8), sequence(10, 4)
    add(sched, running)
    sched.admit(now=0.0)
    step(sched, 20)  # its prompt: it decodes from now on
    add(sched, late)
    sched.admit(now=0.0)
    plan, _ = step(sched, 21)
    assert plan.sampled == [running]  # late's first chunk gives no token
    prompt = plan.chunks[plan.decode_chunks :]
    if mixed:  # one forward; the decode row's token counts against the budget
        assert plan.decode == [] and plan.decode_chunks == 1 and sched.mixed_plans == 1
        row = plan.chunks[0]
        assert (row.token_ids, row.start, row.last, row.score) == ([20], 5, True, False)
        assert row.block_table is running.table.blocks and plan.chunk_seqs[0] is running
        assert [(c.start, len(c.token_ids)) for c in prompt] == [(0, 7)]
    else:
        assert [(r.token_id, r.position) for r in plan.decode] == [(20, 5)]
        assert plan.decode_chunks == 0 and sched.mixed_plans == 0
        assert [(c.start, len(c.token_ids)) for c in prompt] == [(0, 8)]
    plan, _ = step(sched, 22)  # late's prompt ends: it is sampled after the decode row
    assert plan.sampled == [running, late] and running.generated == [20, 21, 22]
    assert late.generated == [22]


def test_a_preempted_sequence_ended_meanwhile_leaves_the_queue():
    """Its last token, taken before the preemption, is emitted after it: a stop sequence
    there finishes it while it waits."""
    sched = scheduler(blocks=4, caching=False)
    old, new = sequence(7, 8), sequence(3, 8)
    add(sched, old, new)
    sched.admit(now=0.0)
    step(sched)
    step(sched)
    sched.schedule()  # ``new`` is preempted
    assert list(sched.waiting) == [new]
    assert not sched.finish(new)  # the engine finishes it: a stop sequence
    assert sched.admit(now=0.0).dropped == [new] and not sched.waiting
