"""Plain-torch twins of the multi-LoRA shrink/expand kernels in ``lora_apply``.

The engine's CPU path and the oracle of the kernel tests. Work is grouped by adapter slot (one
pair of matmuls per distinct slot, over all its tokens and all slices), never a loop per token.
Both read only the first ``slot_ranks[slot]`` rank columns, and follow the kernels' numerics:
float32 accumulation; before expand, the rank-space activations are rounded to the weights' dtype
(the kernel feeds them to a tensor-core dot in that dtype); ``y`` is updated once, in its dtype.

Shapes (the pool layout is the engine's; see ``lora_apply``'s docstring):
``x (T, in)``, ``lora_a (slots, slices, max_rank, in)``, ``lora_b (slots, out_total, max_rank)``,
``slot_ranks (slots,) int32``, ``token_slots (T,) int32`` (-1: no LoRA),
``buf (slices, T, max_rank) float32``, ``y (T, out_total)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


def _slot_groups(
    token_slots: torch.Tensor, slot_ranks: torch.Tensor
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(slot, rank, token rows) for every distinct slot >= 0 of nonzero rank (syncs: CPU path)."""
    slots = token_slots.long()
    for slot in torch.unique(slots[slots >= 0]).tolist():
        rank = int(slot_ranks[slot])
        if rank > 0:
            yield slot, rank, (slots == slot).nonzero().squeeze(1)


def lora_shrink_torch(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    slot_ranks: torch.Tensor,
    token_slots: torch.Tensor,
    buf: torch.Tensor,
    meta: object = None,
) -> None:
    """``buf[s, t, :r] = x[t] @ A[slot_t, s, :r].T`` for tokens with a slot (``meta`` unused)."""
    for slot, rank, rows in _slot_groups(token_slots, slot_ranks):
        a = lora_a[slot, :, :rank].float()  # (slices, r, in)
        buf[:, rows, :rank] = torch.einsum("tk,srk->str", x[rows].float(), a)


def lora_expand_torch(
    buf: torch.Tensor,
    lora_b: torch.Tensor,
    slot_ranks: torch.Tensor,
    token_slots: torch.Tensor,
    y: torch.Tensor,
    slice_offsets: Sequence[int],
    meta: object = None,
) -> None:
    """``y[t, off_s:off_s+1] += buf[s, t, :r] @ lora_b[slot_t, off_s:off_s+1, :r].T`` in place."""
    begin, end = slice_offsets[0], slice_offsets[-1]
    for slot, rank, rows in _slot_groups(token_slots, slot_ranks):
        delta = torch.empty(len(rows), end - begin, dtype=torch.float32, device=y.device)
        for s, (lo, hi) in enumerate(zip(slice_offsets[:-1], slice_offsets[1:], strict=True)):
            h = buf[s, rows, :rank].to(lora_b.dtype).float()
            delta[:, lo - begin : hi - begin] = h @ lora_b[slot, lo:hi, :rank].float().T
        y[rows, begin:end] = (y[rows, begin:end].float() + delta).to(y.dtype)
