"""What one forward runs over: prefill chunks and decode rows (plain data from the scheduler),
and the fixed-address device buffers a captured graph reads them from.

An input token may still be on the device: a step planned before the step in flight has brought
its tokens to the host (``Scheduler.schedule`` ahead) feeds each such row the in-flight step's
sampled token ``prev`` (its index among that step's sampled rows), gathered on the device after
the buffers' host copy. Each buffer's pinned host memory is rewritten only once the copy that
read it has run (with a step planned ahead, that copy may still be queued)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PrefillChunk:
    """A run of one sequence's prompt tokens, starting at position ``start``."""

    seq_id: int
    token_ids: Sequence[int]
    start: int
    block_table: Sequence[int]
    slot: int  # adapter slot, -1: base model
    last: bool  # the prompt's final chunk: its last position gives the first new token
    score: bool = False  # return each token's logprob given the ones before it
    next_token: int | None = None  # the prompt token after this chunk (scores across chunks)
    prev: int = -1  # a decode row's chunk whose token is the in-flight step's sampled ``prev``


@dataclass
class DecodeRow:
    seq_id: int
    token_id: int  # the input token (the last one generated)
    position: int
    block_table: Sequence[int]
    slot: int
    prev: int = -1  # >= 0: the input token is the in-flight step's sampled token ``prev``


class PendingTokens:
    """Input tokens gathered on the device from the previous launch's sampled tokens: pairs
    (input index, sampled index) staged in pinned memory, copied, then one gather."""

    def __init__(self, max_rows: int, device: torch.device) -> None:
        pin = device.type == "cuda"
        self._host = torch.zeros((2, max_rows), dtype=torch.int64, pin_memory=pin)
        self._device = torch.zeros((2, max_rows), dtype=torch.int64, device=device)
        self._read = CopyDone(device)

    def gather(self, input_ids: torch.Tensor, pairs: list[tuple[int, int]], source) -> None:
        """``input_ids[i] = source[j]`` for each pair (i, j); ``source``: the tokens (int64)."""
        if not pairs:
            return
        if source is None:
            raise ValueError("rows read the previous step's tokens, but no step was launched")
        n = len(pairs)
        self._read.wait()
        self._host[:, :n] = torch.tensor(pairs, dtype=torch.int64).T
        index = self._device[:, :n]
        index.copy_(self._host[:, :n], non_blocking=True)
        self._read.record()
        input_ids.index_copy_(0, index[0], source.index_select(0, index[1]))


class CopyDone:
    """When the copies that read a pinned host buffer have run: the host waits for that before
    it rewrites the buffer (a no-op off CUDA, and at once when nothing is queued before)."""

    def __init__(self, device: torch.device) -> None:
        self._event = torch.cuda.Event() if device.type == "cuda" else None

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()

    def record(self) -> None:
        if self._event is not None:
            self._event.record()


def slot_of(block_table: Sequence[int], position: int, block_size: int) -> int:
    return block_table[position // block_size] * block_size + position % block_size


class DecodeBuffers:
    """Inputs of a decode step at fixed addresses, filled with one host-to-device copy.

    One int32 block holds them all, on the host (pinned) and on the device: the int64 inputs
    (token ids, positions, slot mapping), the int32 ones (sequence lengths, adapter slots),
    then the block tables; each part is a view, so the captured graphs read fixed addresses.
    """

    def __init__(self, max_batch: int, max_blocks: int, device: torch.device) -> None:
        self.max_batch, self.max_blocks = max_batch, max_blocks
        words = _aligned(6 * max_batch), _aligned(2 * max_batch)
        self._header = sum(words)  # int32 words before the block tables
        size = self._header + max_batch * max_blocks
        self._host = torch.zeros(size, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._device = torch.zeros(size, dtype=torch.int32, device=device)

        def views(block: torch.Tensor):
            i64 = block[: 6 * max_batch].view(torch.int64).view(3, max_batch)
            i32 = block[words[0] : words[0] + 2 * max_batch].view(2, max_batch)
            return i64, i32, block[self._header :].view(max_batch, max_blocks)

        self._i64, self._i32, self._tables = (t.numpy() for t in views(self._host))
        (self.input_ids, self.positions, self.slot_mapping), i32, self.block_tables = views(
            self._device
        )
        self.seq_lens, self.lora_slots = i32
        self._read = CopyDone(device)
        self.pending = PendingTokens(max_batch, device)

    def fill(self, rows: Sequence[DecodeRow], padded: int, block_size: int, previous=None) -> None:
        """Rows first, then padding rows (length 0, no adapter, KV written to the null block);
        ``previous``: the in-flight step's sampled tokens on the device (rows with ``prev``)."""
        n = len(rows)
        self._read.wait()
        i64, i32, tables = self._i64, self._i32, self._tables
        i64[0, :n] = [r.token_id for r in rows]
        i64[1, :n] = [r.position for r in rows]
        i64[2, :n] = [slot_of(r.block_table, r.position, block_size) for r in rows]
        i32[0, :n] = i64[1, :n] + 1
        i32[1, :n] = [r.slot for r in rows]
        i64[:2, n:padded] = 0
        i64[2, n:padded] = -1
        i32[0, n:padded] = 0
        i32[1, n:padded] = -1
        tables[:padded] = 0
        for i, row in enumerate(rows):
            tables[i, : len(row.block_table)] = row.block_table
        used = self._header + padded * self.max_blocks
        self._device[:used].copy_(self._host[:used], non_blocking=True)
        self._read.record()
        pairs = [(i, r.prev) for i, r in enumerate(rows) if r.prev >= 0]
        self.pending.gather(self.input_ids, pairs, previous)


def _aligned(words: int) -> int:
    """Int32 words rounded up to 16 bytes, so every part of the block starts aligned."""
    return -(-words // 4) * 4


def leading_rows(chunks: Sequence[PrefillChunk]) -> int:
    """How many chunks at the front hold one token each: a mixed step's decode rows (a one-token
    prompt chunk among them is attended alike). Their attention runs in the decode kernel, one
    program per GQA group, where the prefill kernel would run one per query head."""
    rows = 0
    for chunk in chunks:
        if len(chunk.token_ids) != 1:
            break
        rows += 1
    return rows


class PrefillBuffers:
    """Inputs of a prefill forward at fixed addresses: up to ``max_tokens`` prompt tokens of up
    to ``max_seqs`` sequences (one chunk each), filled with one host-to-device copy each.

    Per sequence: ``query_start``, ``query_lens``, ``query_pos`` (the prefill attention's) and
    ``row_lens``. The ``leading_rows`` chunks are rows of the decode attention instead:
    ``row_lens`` is their cached length with their token (0 past them), and their ``query_lens``
    is 0, so the prefill kernel leaves them out."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, device) -> None:
        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        pin = device.type == "cuda"

        def pair(shape, dtype):
            host = torch.zeros(shape, dtype=dtype, pin_memory=pin)
            return host, torch.zeros(shape, dtype=dtype, device=device)

        self._host_tokens, self.tokens = pair((3, max_tokens), torch.int64)
        self._host_slots, self.lora_slots = pair(max_tokens, torch.int32)
        self._host_seqs, self.seqs = pair((4, max_seqs), torch.int32)
        self._host_last, self.last = pair(max_seqs, torch.int64)
        # The chunks that end their prompts: the rows of the logits sampled (the others' are not).
        self._host_sampled, self.sampled = pair(max_seqs, torch.int64)
        self._host_tables, self.block_tables = pair((max_seqs, max_blocks), torch.int32)
        self.input_ids, self.positions, self.slot_mapping = self.tokens
        self.query_start, self.query_lens, self.query_pos, self.row_lens = self.seqs
        self._read = CopyDone(device)
        self.pending = PendingTokens(max_seqs, device)
        self.rows = 0  # the last fill's ``leading_rows``

    def fill(
        self, chunks: Sequence[PrefillChunk], padded: int, block_size: int, previous=None
    ) -> int:
        """Chunks' tokens first, then padding tokens (no adapter, KV not written); sequences
        past the chunks have no queries. Returns the sequence entries the forward reads.
        ``previous``: the in-flight step's sampled tokens on the device (chunks with ``prev``)."""
        seqs = min(self.max_seqs, padded)  # every chunk holds a token
        self._read.wait()
        tokens, slots = self._host_tokens.numpy(), self._host_slots.numpy()
        per_seq, last = self._host_seqs.numpy(), self._host_last.numpy()
        tables = self._host_tables.numpy()
        tokens[:, :padded] = 0
        tokens[2, :padded] = -1
        slots[:padded] = -1
        per_seq[:, :seqs] = 0
        last[:seqs] = 0
        tables[:seqs] = 0
        n = len(chunks)  # vectorized: a mixed step has a one-token chunk per decode row
        lens = np.fromiter((len(c.token_ids) for c in chunks), np.int64, n)
        starts = np.fromiter((c.start for c in chunks), np.int64, n)
        ends = np.cumsum(lens)
        firsts, total = ends - lens, int(ends[-1]) if n else 0
        chunk_of = np.repeat(np.arange(n), lens)  # each token's chunk
        positions = np.arange(total) - firsts[chunk_of] + starts[chunk_of]
        for s, c in enumerate(chunks):
            tables[s, : len(c.block_table)] = c.block_table
        tokens[0, :total] = list(itertools.chain.from_iterable(c.token_ids for c in chunks))
        tokens[1, :total] = positions
        tokens[2, :total] = tables[chunk_of, positions // block_size] * block_size + (
            positions % block_size
        )
        slots[:total] = np.repeat(np.fromiter((c.slot for c in chunks), np.int64, n), lens)
        per_seq[0, :n], per_seq[1, :n], per_seq[2, :n] = firsts, lens, starts
        rows = self.rows = leading_rows(chunks)
        per_seq[1, :rows], per_seq[3, :rows] = 0, starts[:rows] + 1
        last[:n] = ends - 1
        self.tokens[:, :padded].copy_(self._host_tokens[:, :padded], non_blocking=True)
        self.lora_slots[:padded].copy_(self._host_slots[:padded], non_blocking=True)
        self.seqs[:, :seqs].copy_(self._host_seqs[:, :seqs], non_blocking=True)
        self.last[:seqs].copy_(self._host_last[:seqs], non_blocking=True)
        self.block_tables[:seqs].copy_(self._host_tables[:seqs], non_blocking=True)
        sampled = np.flatnonzero(np.fromiter((c.last for c in chunks), bool, n))
        if len(sampled) < n:  # a device index, copied like the rest (no host sync)
            self._host_sampled.numpy()[: len(sampled)] = sampled
            self.sampled[: len(sampled)].copy_(
                self._host_sampled[: len(sampled)], non_blocking=True
            )
        self._read.record()
        pairs = [(int(firsts[i]), c.prev) for i, c in enumerate(chunks) if c.prev >= 0]
        self.pending.gather(self.input_ids, pairs, previous)
        return seqs


def padded_sizes(max_size: int, smallest: int = 1, midpoints_from: int | None = None) -> list[int]:
    """Sizes a graph is captured for: powers of two from ``smallest``, from ``midpoints_from``
    on also the size halfway to the next (192, 384, ...), and the maximum."""
    sizes, size = [], smallest
    while size < max_size:
        sizes.append(size)
        if midpoints_from is not None and size >= midpoints_from and size * 3 // 2 < max_size:
            sizes.append(size * 3 // 2)
        size *= 2
    return [*sizes, max_size]
