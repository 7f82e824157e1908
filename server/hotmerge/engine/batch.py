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
    """Inputs of a decode step at fixed addresses, filled with one host-to-device copy each."""

    def __init__(self, max_batch: int, max_blocks: int, device: torch.device) -> None:
        self.max_batch, self.max_blocks = max_batch, max_blocks
        pin = device.type == "cuda"

        def pair(shape, dtype):
            host = torch.zeros(shape, dtype=dtype, pin_memory=pin)
            return host, torch.zeros(shape, dtype=dtype, device=device)

        self._host_i64, self.i64 = pair((4, max_batch), torch.int64)
        self._host_i32, self.i32 = pair((2, max_batch), torch.int32)
        self._host_tables, self.block_tables = pair((max_batch, max_blocks), torch.int32)
        self.input_ids, self.positions, self.slot_mapping, _ = self.i64
        self.seq_lens, self.lora_slots = self.i32
        self._tables = self._host_tables.numpy()

    def fill(self, rows: Sequence[DecodeRow], padded: int, block_size: int) -> None:
        """Rows first, then padding rows (length 0, no adapter, KV written to the null block)."""
        n = len(rows)
        i64 = self._host_i64.numpy()
        i32 = self._host_i32.numpy()
        i64[:, :padded] = 0
        i32[:, :padded] = 0
        i64[2, n:padded] = -1
        i32[1, n:padded] = -1
        tables = self._tables
        tables[:padded] = 0
        for i, row in enumerate(rows):
            i64[0, i] = row.token_id
            i64[1, i] = row.position
            i64[2, i] = slot_of(row.block_table, row.position, block_size)
            i32[0, i] = row.position + 1
            i32[1, i] = row.slot
            tables[i, : len(row.block_table)] = row.block_table
        self.i64[:, :padded].copy_(self._host_i64[:, :padded], non_blocking=True)
        self.i32[:, :padded].copy_(self._host_i32[:, :padded], non_blocking=True)
        self.block_tables[:padded].copy_(self._host_tables[:padded], non_blocking=True)


def padded_sizes(max_batch: int) -> list[int]:
    """Batch sizes a decode graph is captured for: powers of two, and the maximum."""
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch]
