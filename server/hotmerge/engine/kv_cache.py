"""The paged KV cache: one pool of fixed-size blocks per layer, and their bookkeeping.

Tensors: per layer ``k, v: (num_blocks, block_size, kv_heads, head_dim)``. A sequence owns a
list of blocks (its block table); token ``p`` of it lives in block ``table[p // block_size]``
at offset ``p % block_size``. Block 0 is never handed out: padding rows of a captured batch
write there, so their writes can never land on a real sequence's tokens.

Admission reserves a request's worst case (prompt + max_new_tokens) without allocating it:
blocks are taken as tokens arrive, so a request holds only what its tokens need, yet a running
request can always grow, and no step ever runs out of blocks (no preemption needed).
"""

from __future__ import annotations

import torch

NULL_BLOCK = 0


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class KVBlockPool:
    """Free blocks and reservations; pure Python (the scheduler's view of the cache)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, NULL_BLOCK, -1))  # pop() hands out low ids first
        self._reserved = 0  # blocks promised to running requests but not yet taken

    @property
    def capacity_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks holding tokens (0-1)."""
        return 1.0 - len(self._free) / self.capacity_blocks

    def can_reserve(self, blocks: int) -> bool:
        return len(self._free) - self._reserved >= blocks

    def reserve(self, blocks: int) -> None:
        if not self.can_reserve(blocks):
            raise RuntimeError("KV blocks reserved beyond what is free")
        self._reserved += blocks

    def take(self, count: int) -> list[int]:
        """Take ``count`` reserved blocks."""
        if count > self._reserved or count > len(self._free):
            raise RuntimeError("KV block taken without a reservation")
        self._reserved -= count
        return [self._free.pop() for _ in range(count)]

    def release(self, blocks: list[int], unused_reservation: int) -> None:
        """Give back a finished request's blocks and what it reserved but never took."""
        self._free.extend(reversed(blocks))
        self._reserved -= unused_reservation


def allocate_kv(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return [
        (
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )
        for _ in range(num_layers)
    ]


def block_bytes(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype) -> int:
    """Device bytes of one block across all layers (K and V)."""
    return (
        2
        * num_layers
        * block_size
        * kv_heads
        * head_dim
        * torch.empty((), dtype=dtype).element_size()
    )
