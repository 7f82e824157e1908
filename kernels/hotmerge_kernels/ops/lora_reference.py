"""Plain-torch twins of the multi-LoRA shrink/expand kernels in ``lora_apply``.

The engine's CPU path and the oracle of the kernel tests. Work is grouped by adapter slot (one
pair of matmuls per distinct slot, over all its tokens and all slices), never a loop per token.
Both read only the first ``slot_ranks[slot]`` rank columns, and follow the kernels' numerics:
float32 accumulation; expand sums ``buf``'s splits in order ``0, 1, ...`` and rounds the sum to
the weights' dtype (the kernel feeds it to a tensor-core dot in that dtype); ``y`` is updated
once, in its dtype. Shrink writes the whole product into split 0 and zeros into the others (the
kernel's partials of ``in``'s ranges have the same sum, in another order).

Shapes (the pool layout is the engine's; see ``lora_apply``'s docstring):
``x (T, in)``, ``lora_a (slots, slices, max_rank, in)``, ``lora_b (slots, max_rank, out_total)``,
``slot_ranks (slots,) int32``, ``token_slots (T,) int32`` (-1: no LoRA),
``buf (splits, slices, T, max_rank) float32``, ``y (T, out_total)``.
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
    """``buf[0, s, t, :r] = x[t] @ A[slot_t, s, :r].T``, ``buf[1:, s, t, :r] = 0`` for tokens
    with a slot (``meta`` unused)."""
    for slot, rank, rows in _slot_groups(token_slots, slot_ranks):
        a = lora_a[slot, :, :rank].float()  # (slices, r, in)
        buf[0, :, rows, :rank] = torch.einsum("tk,srk->str", x[rows].float(), a)
        buf[1:, :, rows, :rank] = 0.0


def lora_expand_torch(
    buf: torch.Tensor,
    lora_b: torch.Tensor,
    slot_ranks: torch.Tensor,
    token_slots: torch.Tensor,
    y: torch.Tensor,
    slice_offsets: Sequence[int],
    meta: object = None,
) -> None:
    """``y[t, off_s:off_s+1] += (sum over p of buf[p, s, t, :r]) @ lora_b[slot_t, :r,
    off_s:off_s+1]`` in place."""
    begin, end = slice_offsets[0], slice_offsets[-1]
    for slot, rank, rows in _slot_groups(token_slots, slot_ranks):
        parts = buf[:, :, rows, :rank]
        summed = parts[0]
        for p in range(1, parts.shape[0]):  # the kernel's order
            summed = summed + parts[p]
        delta = torch.empty(len(rows), end - begin, dtype=torch.float32, device=y.device)
        for s, (lo, hi) in enumerate(zip(slice_offsets[:-1], slice_offsets[1:], strict=True)):
            h = summed[s].to(lora_b.dtype).float()
            delta[:, lo - begin : hi - begin] = h @ lora_b[slot, :rank, lo:hi].float()
        y[rows, begin:end] = (y[rows, begin:end].float() + delta).to(y.dtype)
