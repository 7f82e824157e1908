"""The paged KV cache: one pool of fixed-size blocks per layer, and their bookkeeping.

Tensors: per layer ``k, v: (num_blocks, block_size, kv_heads, head_dim)``. A sequence owns a
list of blocks (its block table); token ``p`` of it lives in block ``table[p // block_size]``
at offset ``p % block_size``. Block 0 is never handed out: padding rows of a captured batch
write there, so their writes can never land on a real sequence's tokens.

The blocks' bookkeeping (who holds which, prefix caching, allocation by need) is the
:class:`~hotmerge.engine.block_manager.BlockManager`'s.
"""

from __future__ import annotations

import torch

NULL_BLOCK = 0


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


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
