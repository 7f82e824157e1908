"""The kernels' module-level caches under concurrent callers (issue 18).

The server merges different keys at once on its RPC threads, and every merge goes through the
kernels' caches of plans, launches and address tables. These tests call the caches, and the
functions that fill them, from many threads at once, with more keys than a cache holds (so
lookups, inserts and evictions interleave), and check every answer. The unlocked ``lru_get``
that these caches shared before raised ``KeyError`` here (an entry evicted between a lookup and
its ``move_to_end``).
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Callable

import pytest
import torch
from hotmerge_kernels.layout import FlatAdapter
from hotmerge_kernels.merge import merge_adapters
from hotmerge_kernels.merge.params import MergeParams, Strategy
from hotmerge_kernels.merge.plan import get_plan
from hotmerge_kernels.merge.tables import TABLE_CACHE_SIZE, address_table

from tests.kernels.random_adapters import make_adapter

THREADS = 16


def hammer(work: Callable[[random.Random], None], calls: int, threads: int = THREADS) -> None:
    """``work(rng)`` ``calls`` times in each of ``threads`` threads started together, with the
    interpreter switching threads as often as it can; fails with the threads' first error."""
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def run(seed: int) -> None:
        rng = random.Random(seed)
        start.wait()
        try:
            for _ in range(calls):
                work(rng)
        except BaseException as err:  # noqa: BLE001 - reported below, with the thread count
            errors.append(err)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        pool = [threading.Thread(target=run, args=(seed,)) for seed in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in pool), "a thread did not finish in 120 s"
    finally:
        sys.setswitchinterval(interval)
    assert not errors, f"{len(errors)} of {threads} threads failed, first: {errors[0]!r}"


class YieldingKey:
    """A key whose hashing lets the other threads run (``time.sleep(0)`` releases the GIL), so
    every lookup of the cache is a point where another caller gets in, as on a busy server."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __hash__(self) -> int:
        time.sleep(0)
        return hash(self.n)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, YieldingKey) and other.n == self.n

    def __repr__(self) -> str:
        return f"YieldingKey({self.n})"


@pytest.mark.parametrize("size, keys", [(1, 2), (2, 3), (8, 12)])
def test_locked_lru_under_threads(size, keys):
    """More keys than room, so hits, misses and evictions interleave."""
    from hotmerge_kernels.lru import LockedLRU

    cache: LockedLRU[tuple] = LockedLRU(size)
    made = []

    def work(rng: random.Random) -> None:
        key = YieldingKey(rng.randrange(keys))
        value = cache.get(key, lambda: made.append(key.n) or ("value", key.n))
        assert value == ("value", key.n)

    hammer(work, calls=200)
    assert len(cache) == size
    assert len(made) > keys  # evicted keys were made again


def test_locked_lru_keeps_the_first_value_stored():
    """Two callers that miss one key at once both build it; both get the one stored."""
    from hotmerge_kernels.lru import LockedLRU

    cache: LockedLRU[object] = LockedLRU(4)
    both_building = threading.Barrier(2)

    def make() -> object:
        both_building.wait(timeout=10)
        return object()

    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.get("k", make))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(got) == 2 and got[0] is got[1] is cache.get("k", object)


def _layouts(count: int) -> list[FlatAdapter]:
    """Adapters of ``count`` different layouts (one module each, its shape differs)."""
    return [make_adapter({"m.q_proj": (8 + i, 5)}, rank=2, seed=i) for i in range(count)]


def test_get_plan_under_threads():
    adapters = _layouts(48)  # the plan cache keeps 32

    def work(rng: random.Random) -> None:
        adapter = rng.choice(adapters)
        plan = get_plan([adapter], cat=False)
        assert plan.total == adapter.buffer.numel()
        assert [s.shape for s in plan.segments] == [s.shape for s in adapter.segments]

    hammer(work, calls=300)


def test_address_table_under_threads():
    tensors = [torch.randn(3) for _ in range(TABLE_CACHE_SIZE + 64)]
    tables = [random.Random(i).sample(tensors, 2) for i in range(TABLE_CACHE_SIZE + 32)]

    def work(rng: random.Random) -> None:
        chosen = rng.choice(tables)
        table = address_table(chosen, torch.device("cpu"))
        assert table.tolist() == [t.data_ptr() for t in chosen]

    hammer(work, calls=1000)


def test_concurrent_merges_match_serial_ones():
    """Merges of different layouts at once (plans evicted and rebuilt meanwhile) give exactly
    what each gives alone."""
    pairs = [
        (a, make_adapter({"m.q_proj": (8 + i, 5)}, rank=2, seed=100 + i))
        for i, a in enumerate(_layouts(40))  # the plan cache keeps 32
    ]
    params = MergeParams(Strategy.TIES, weights=(0.7, -1.3), density=0.5)
    want = [merge_adapters(p, params, backend="torch").adapter.buffer for p in pairs]

    def work(rng: random.Random) -> None:
        i = rng.randrange(len(pairs))
        got = merge_adapters(pairs[i], params, backend="torch").adapter.buffer
        assert torch.equal(got, want[i])

    hammer(work, calls=12, threads=8)
