"""What one forward runs over: prefill chunks and decode rows (plain data from the scheduler),
and the fixed-address device buffers a captured decode graph reads them from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass
class DecodeRow:
    seq_id: int
    token_id: int  # the input token (the last one generated)
    position: int
    block_table: Sequence[int]
    slot: int


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

    def fill(self, rows: Sequence[DecodeRow], padded: int, block_size: int) -> None:
        """Rows first, then padding rows (length 0, no adapter, KV written to the null block)."""
        n = len(rows)
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


def _aligned(words: int) -> int:
    """Int32 words rounded up to 16 bytes, so every part of the block starts aligned."""
    return -(-words // 4) * 4


def padded_sizes(max_batch: int) -> list[int]:
    """Batch sizes a decode graph is captured for: powers of two, and the maximum."""
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch]
