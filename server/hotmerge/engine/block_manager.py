"""KV blocks with automatic prefix caching and allocation by need; pure Python, no device calls.

A sequence's blocks are a :class:`BlockTable`. A *full* block whose KV has been computed is
registered under its content: (the block before it, the adapter key, its tokens). The adapter
key is part of it because a LoRA adapter changes every layer's K and V after the first (the
base model's key is None). The block before is named by a content id that is never reused, so
a lookup matches a block only if the whole prefix before it is the same; matches are exact
(the dict compares the tuples), never a bare hash, so a hash collision can never hand one
request another's KV.

A new sequence reuses the longest run of registered blocks that starts its tokens (only
blocks wholly inside its first ``len - 1`` tokens: the last token is always computed, for its
logits, and never written into a shared block). Blocks are reference counted: one shared by
several sequences is freed when the last lets go. A freed registered block stays *cached*: it
can still be hit, and it is evicted (least recently freed first) when a free block is needed.
A sequence's blocks are freed tail first, so a prefix outlives its continuations.

Two ways to admit, one pool:
- worst case: ``allocate(..., reserve=extra)`` also promises ``extra`` blocks for the tokens
  to come (``can_reserve`` semantics: promised blocks are never handed to anyone else);
- by need: ``allocate`` takes only the prompt's blocks and ``grow`` takes one block when a row
  crosses a block boundary; when ``grow`` finds none, :func:`preemption_victims` names the
  rows to free (most recently admitted first) and they are recomputed later.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from hotmerge.engine.kv_cache import NULL_BLOCK, blocks_for

_NO_PARENT = 0  # the content id before a sequence's first block


@dataclass(eq=False)
class BlockTable:
    """One sequence's blocks: token ``p`` lives in ``blocks[p // block_size]``."""

    key: Hashable  # the adapter or merge key the KV was computed with (None: the base model)
    blocks: list[int] = field(default_factory=list)
    cached_tokens: int = 0  # tokens whose KV was already in the cache at allocation
    reserved: int = 0  # blocks promised to this sequence and not yet taken
    # Content ids of its leading blocks registered so far (its own or hits), in order.
    registered: list[int] = field(default_factory=list)


class BlockManager:
    """Free blocks, cached blocks, reference counts and reservations of one KV pool."""

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free = list(range(num_blocks - 1, NULL_BLOCK, -1))  # pop() hands out low ids first
        self._refs = [0] * num_blocks
        self._cached: OrderedDict[int, None] = OrderedDict()  # unreferenced, registered: LRU
        self._by_content: dict[tuple, int] = {}  # (parent id, key, tokens) -> block
        self._content_of: dict[int, tuple[tuple, int]] = {}  # block -> (its content, its id)
        self._ids = itertools.count(_NO_PARENT + 1)
        self._reserved = 0
        self.queries = 0  # prompt tokens looked up in the cache (allocations that succeeded)
        self.hits = 0  # of which found there

    # -- state -------------------------------------------------------------------------------

    @property
    def capacity_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        """Blocks that can be handed out now: empty ones and cached ones (evictable)."""
        return len(self._free) + len(self._cached)

    @property
    def cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by running sequences (0-1)."""
        return 1.0 - self.free_blocks / self.capacity_blocks

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    def can_reserve(self, blocks: int) -> bool:
        return self.free_blocks - self._reserved >= blocks

    def fits_ever(self, tokens: int) -> bool:
        """Whether a sequence of ``tokens`` fits the empty pool (else refuse it at once)."""
        return blocks_for(tokens, self.block_size) <= self.capacity_blocks

    # -- a sequence's life ---------------------------------------------------------------------

    def allocate(
        self, tokens: Sequence[int], key: Hashable = None, *, reserve: int = 0, lookup: bool = True
    ) -> BlockTable | None:
        """Blocks for ``tokens`` (cached ones first, unless not ``lookup``: a sequence that
        must compute every token, e.g. to score its prompt) and ``reserve`` more promised;
        None, with nothing changed, when the pool cannot give that many now."""
        size = self.block_size
        hits: list[int] = []
        ids: list[int] = []
        if self.prefix_caching and lookup:
            parent, content, by_content = _NO_PARENT, self._content_of, self._by_content
            whole = tuple(tokens)  # one copy; its slices are cheap
            for start in range(0, len(whole) - size, size):  # full blocks before the last token
                block = by_content.get((parent, key, whole[start : start + size]))
                if block is None:
                    break
                hits.append(block)
                parent = content[block][1]
                ids.append(parent)
        fresh = blocks_for(len(tokens), size) - len(hits)
        revived = sum(1 for b in hits if self._refs[b] == 0)  # cached: they leave the free count
        if not self.can_reserve(fresh + revived + reserve):
            return None
        for block in hits:
            self._ref(block)
        table = BlockTable(key, hits + self._take(fresh), len(hits) * size, reserve, ids)
        self._reserved += reserve
        if self.prefix_caching and lookup:
            self.queries += len(tokens)
            self.hits += table.cached_tokens
        return table

    def grow(self, table: BlockTable, tokens: int) -> bool:
        """Make the table's blocks cover ``tokens`` positions (from its reservation first);
        False, with nothing taken, when the pool has no room (preempt, then try again)."""
        missing = blocks_for(tokens, self.block_size) - len(table.blocks)
        if missing <= 0:
            return True
        own = min(missing, table.reserved)
        if not self.can_reserve(missing - own):
            return False
        self._reserved -= own
        table.reserved -= own
        table.blocks.extend(self._take(missing))
        return True

    def commit(self, table: BlockTable, tokens: Sequence[int], computed: int) -> None:
        """Register the table's full blocks among the first ``computed`` tokens (their KV is
        in the cache now) so later sequences can reuse them; call after each step."""
        if not self.prefix_caching:
            return
        size = self.block_size
        full = min(computed // size, len(table.blocks))
        for i in range(len(table.registered), full):
            parent = table.registered[-1] if table.registered else _NO_PARENT
            content = (parent, table.key, tuple(tokens[i * size : (i + 1) * size]))
            block = table.blocks[i]
            known = self._by_content.get(content)
            if known is None and block not in self._content_of:
                known = block
                self._by_content[content] = block
                self._content_of[block] = (content, next(self._ids))
            if known is None:  # the block already holds other content: cannot happen
                raise RuntimeError(f"KV block {block} registered twice")
            # Computed twice at once (two misses): keep the first; ours stays unregistered.
            table.registered.append(self._content_of[known][1])

    def release(self, table: BlockTable) -> None:
        """Give back a finished, failed, cancelled or preempted sequence's blocks (tail first)
        and its unused reservation; the table is empty afterwards."""
        for block in reversed(table.blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._content_of:
                    self._cached[block] = None  # most recently freed: evicted last
                else:
                    self._free.append(block)
        self._reserved -= table.reserved
        table.blocks, table.registered, table.reserved = [], [], 0

    def freeable(self, table: BlockTable) -> int:
        """Blocks that releasing ``table`` would make free (those no other sequence holds)."""
        return sum(1 for b in table.blocks if self._refs[b] == 1) + table.reserved

    # -- internals -----------------------------------------------------------------------------

    def _ref(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._cached[block]
        self._refs[block] += 1

    def _take(self, count: int) -> list[int]:
        """``count`` unreferenced blocks: empty ones first, then the least recently freed
        cached ones (evicted: their content is forgotten)."""
        taken = []
        for _ in range(count):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._cached.popitem(last=False)
                content, _ = self._content_of.pop(block)
                del self._by_content[content]
            self._refs[block] = 1
            taken.append(block)
        return taken


@dataclass(frozen=True)
class RowUse:
    """What preemption needs to know of a running row."""

    row: Hashable  # the caller's id for it
    admitted: int  # admission order (larger: admitted later)
    freeable: int  # blocks it would free (``BlockManager.freeable``)


def preemption_victims(rows: Sequence[RowUse], needed: int, needing: Hashable = None) -> list:
    """The rows to preempt (most recently admitted first) until ``needed`` blocks are free.

    ``needing`` is the row that wants the blocks: if it is reached, it is preempted itself and
    the list ends there (its need goes with it). Blocks shared between victims are not
    counted, so a victim more than strictly needed may be named. If every row together
    cannot free ``needed``, every row is named."""
    victims, freed = [], 0
    for use in sorted(rows, key=lambda u: u.admitted, reverse=True):
        if freed >= needed:
            break
        victims.append(use.row)
        if use.row == needing:
            break
        freed += use.freeable
    return victims
