"""The block manager: prefix caching, reference counts, LRU eviction, reservations, growth by
need and the choice of rows to preempt (pure Python)."""

from __future__ import annotations

import random

import pytest
from hotmerge.engine.block_manager import BlockManager, RowUse, preemption_victims
from hotmerge.engine.kv_cache import NULL_BLOCK
from hypothesis import given, settings
from hypothesis import strategies as st

BS = 4


def toks(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(n)]


def run_seq(pool: BlockManager, tokens: list[int], key=None):
    """Allocate, 'compute' the whole prompt, register it."""
    table = pool.allocate(tokens, key)
    assert table is not None
    pool.commit(table, tokens, len(tokens))
    return table


def test_hit_after_miss_reuses_the_blocks_and_counts_the_tokens():
    pool = BlockManager(32, BS)
    prompt = toks(11)  # 2 full blocks + 3 tokens
    first = run_seq(pool, prompt)
    assert first.cached_tokens == 0 and len(first.blocks) == 3
    second = pool.allocate(prompt, None)
    assert second.blocks[:2] == first.blocks[:2]  # the full blocks are shared
    assert second.blocks[2] != first.blocks[2]  # the partial last block never is
    assert second.cached_tokens == 2 * BS
    assert (pool.queries, pool.hits) == (22, 8)
    assert pool.hit_rate == pytest.approx(8 / 22)


def test_a_longer_prompt_hits_its_shared_prefix_only():
    pool = BlockManager(32, BS)
    shared = toks(8)
    first = run_seq(pool, shared + toks(5, seed=1))
    other = pool.allocate(shared + toks(9, seed=2), None)
    assert other.blocks[:2] == first.blocks[:2] and other.cached_tokens == 8
    assert not set(other.blocks[2:]) & set(first.blocks)
    # the same block content after a different prefix is not a hit
    moved = pool.allocate(toks(4, seed=3) + shared[4:8] + [1], None)
    assert moved.cached_tokens == 0


def test_the_last_token_is_always_computed():
    pool = BlockManager(32, BS)
    prompt = toks(8)  # exactly 2 blocks
    first = run_seq(pool, prompt)
    again = pool.allocate(prompt, None)
    assert again.cached_tokens == BS  # the last block holds the last token: computed again
    assert again.blocks[0] == first.blocks[0] and again.blocks[1] != first.blocks[1]


def test_different_adapter_keys_never_share():
    pool = BlockManager(32, BS)
    prompt = toks(13)
    base = run_seq(pool, prompt, None)
    a = run_seq(pool, prompt, "adapter-a@rev1")
    b = pool.allocate(prompt, "merge:ties:abc")
    assert a.cached_tokens == 0 and b.cached_tokens == 0
    assert not set(base.blocks) & set(a.blocks) and not set(a.blocks) & set(b.blocks)
    assert pool.allocate(prompt, "adapter-a@rev1").blocks[:3] == a.blocks[:3]


def test_uncomputed_blocks_are_not_hits():
    pool = BlockManager(32, BS)
    prompt = toks(9)
    first = pool.allocate(prompt, None)
    assert pool.allocate(prompt, None).cached_tokens == 0  # nothing computed yet
    pool.commit(first, prompt, 5)  # only the first block computed
    assert pool.allocate(prompt, None).cached_tokens == BS


def test_shared_block_is_freed_by_the_last_holder_and_cached_blocks_revive():
    pool = BlockManager(8, BS)  # 7 usable
    prompt = toks(9)
    a = run_seq(pool, prompt)
    b = pool.allocate(prompt, None)
    assert pool.free_blocks == 7 - 4  # a: 3 blocks, b: 2 shared + 1 own
    pool.release(a)
    assert pool.free_blocks == 7 - 3  # a's last block freed, the shared ones still held
    pool.release(b)
    assert pool.free_blocks == 7 and pool.cached_blocks == 2
    c = pool.allocate(prompt, None)  # hits the cached blocks: they leave the free count
    assert c.cached_tokens == 8 and pool.free_blocks == 7 - 3 and pool.cached_blocks == 0


def test_eviction_is_least_recently_freed_first():
    pool = BlockManager(6, BS)  # 5 usable
    old, new = toks(5, seed=1), toks(5, seed=2)  # one full block each (+1 token)
    t_old = run_seq(pool, old)
    t_new = run_seq(pool, new)
    pool.release(t_old)
    pool.release(t_new)
    assert pool.cached_blocks == 2
    # 4 blocks wanted: 3 empty ones, then the least recently freed cached block (old's)
    big = pool.allocate(toks(16, seed=3), None)
    assert len(big.blocks) == 4 and pool.cached_blocks == 1
    pool.release(big)
    assert pool.allocate(old, None).cached_tokens == 0  # evicted
    assert pool.allocate(new, None).cached_tokens == BS  # kept


def test_release_frees_the_tail_first():
    pool = BlockManager(8, BS)
    table = run_seq(pool, toks(13))
    full = table.blocks[:3]
    pool.release(table)
    assert list(pool._cached) == full[::-1]  # the prefix is evicted last


def test_duplicate_computation_keeps_the_first_and_frees_the_other():
    pool = BlockManager(16, BS)
    prompt = toks(9)
    a = pool.allocate(prompt, None)
    b = pool.allocate(prompt, None)  # both missed: two copies computed
    pool.commit(a, prompt, 9)
    pool.commit(b, prompt, 9)
    c = pool.allocate(prompt, None)
    assert c.blocks[:2] == a.blocks[:2]
    for t in (a, b, c):
        pool.release(t)
    assert pool.free_blocks == 15 and pool.cached_blocks == 2


def test_generated_tokens_are_cached_too():
    pool = BlockManager(16, BS)
    prompt = toks(6)
    table = run_seq(pool, prompt)
    seq = prompt + toks(3, seed=9)  # decode reaches 9 tokens: block 2 full
    assert pool.grow(table, len(seq))
    pool.commit(table, seq, len(seq))
    follow = pool.allocate(seq + [7], None)
    assert follow.cached_tokens == 8 and follow.blocks[:2] == table.blocks[:2]


def test_turned_off_nothing_is_shared_or_counted():
    pool = BlockManager(16, BS, prefix_caching=False)
    prompt = toks(9)
    a = run_seq(pool, prompt)
    b = pool.allocate(prompt, None)
    assert b.cached_tokens == 0 and not set(a.blocks) & set(b.blocks)
    pool.release(a)
    pool.release(b)
    assert pool.cached_blocks == 0 and pool.free_blocks == 15 and pool.queries == 0


def test_reservations_keep_can_reserve_semantics():
    pool = BlockManager(8, BS)  # 7 usable
    a = pool.allocate(toks(4), None, reserve=3)  # worst case: 1 block now, 3 promised
    assert a is not None and len(a.blocks) == 1
    assert pool.can_reserve(3) and not pool.can_reserve(4)
    assert pool.allocate(toks(13, seed=1), None) is None  # 4 blocks: refused, nothing taken
    assert pool.free_blocks == 6 and pool.queries == 4
    assert pool.grow(a, 9) and len(a.blocks) == 3 and a.reserved == 1  # from its reservation
    assert pool.can_reserve(3) and not pool.can_reserve(4)
    pool.release(a)  # gives back the unused reservation too
    assert pool.can_reserve(7) and pool._reserved == 0


def test_grow_by_need_fails_cleanly_when_full():
    pool = BlockManager(4, BS)  # 3 usable
    a = run_seq(pool, toks(5))  # 2 blocks
    b = run_seq(pool, toks(3, seed=1))  # 1 block
    assert pool.grow(a, 8)  # still inside its second block
    assert not pool.grow(a, 9)  # a third block: none left
    assert len(a.blocks) == 2 and pool.free_blocks == 0
    assert pool.freeable(b) == 1
    pool.release(b)
    assert pool.grow(a, 9) and len(a.blocks) == 3
    assert NULL_BLOCK not in a.blocks


def test_fits_ever():
    pool = BlockManager(5, BS)
    assert pool.fits_ever(16) and not pool.fits_ever(17)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_random_lives_return_the_pool_to_full(data):
    """Any mix of allocations, growth, commits and releases: blocks are never handed to two
    sequences unless shared by content, and the pool is full again at the end."""
    pool = BlockManager(24, BS, prefix_caching=data.draw(st.booleans()))
    prefixes = [toks(8, seed=s) for s in range(3)]
    live = []
    for _ in range(data.draw(st.integers(1, 40))):
        op = data.draw(st.sampled_from(["alloc", "grow", "release"]))
        if op == "alloc":
            tokens = data.draw(st.sampled_from(prefixes)) + toks(data.draw(st.integers(1, 9)))
            key = data.draw(st.sampled_from([None, "a"]))
            table = pool.allocate(tokens, key, reserve=data.draw(st.integers(0, 2)))
            if table is not None:
                pool.commit(table, tokens, len(tokens))
                live.append((table, tokens))
        elif op == "grow" and live:
            table, tokens = data.draw(st.sampled_from(live))
            more = tokens + toks(data.draw(st.integers(1, 6)), seed=len(tokens))
            if pool.grow(table, len(more)):
                tokens[:] = more
                pool.commit(table, tokens, len(tokens))
        elif op == "release" and live:
            table, _ = live.pop(data.draw(st.integers(0, len(live) - 1)))
            pool.release(table)
        held = [b for t, _ in live for b in t.blocks]
        assert sum(pool._refs) == len(held)
        assert pool.free_blocks + len(set(held)) == pool.capacity_blocks
    for table, _ in live:
        pool.release(table)
    assert pool.free_blocks == pool.capacity_blocks and pool._reserved == 0
    assert not any(pool._refs)


def test_preemption_picks_the_most_recently_admitted():
    rows = [RowUse("a", 1, 5), RowUse("b", 2, 2), RowUse("c", 3, 1), RowUse("d", 4, 3)]
    assert preemption_victims(rows, 0) == []
    assert preemption_victims(rows, 3) == ["d"]
    assert preemption_victims(rows, 4) == ["d", "c"]
    assert preemption_victims(rows, 5, needing="a") == ["d", "c", "b"]
    assert preemption_victims(rows, 100) == ["d", "c", "b", "a"]
    # the row that needs the block is the newest: it yields itself, nobody else
    assert preemption_victims(rows, 3, needing="d") == ["d"]
    assert preemption_victims(rows, 4, needing="c") == ["d", "c"]
