"""The decode step's operators, each dispatched to a Triton kernel on CUDA or its torch twin.

The model code calls only these, so it reads the same on every device: on CUDA the fused
Triton kernels of ``hotmerge_kernels`` (capturable in a CUDA graph), elsewhere the torch twins
beside them (the CPU path, and the tests' oracle).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
):
    """transformers' RMSNorm (fp32 variance, ``weight * normalized.to(dtype)``); with
    ``residual``: normalise ``x + residual`` and also return that sum (the new residual)."""
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, x)


def rotary_and_cache(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping) -> None:
    """RoPE (rotate-half) on q and k in place; roped k and v written to the paged cache at
    ``slot_mapping`` (flat block*block_size+offset; -1 skips)."""
    c = cos[positions].unsqueeze(1)  # (T, 1, D/2) fp32
    s = sin[positions].unsqueeze(1)
    for t in (q, k):
        half = t.shape[-1] // 2
        x1, x2 = t[..., :half].float(), t[..., half:].float()
        t.copy_(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1))
    if k_cache is not None:
        write_kv(k, v, k_cache, v_cache, slot_mapping)


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    keep = slot_mapping >= 0
    index = torch.where(keep, slot_mapping, 0)
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    # Rows with slot -1 rewrite slot 0 with its own value: branch-free, hence capturable.
    flat_k.index_copy_(0, index, torch.where(keep[:, None, None], k, flat_k[index]))
    flat_v.index_copy_(0, index, torch.where(keep[:, None, None], v, flat_v[index]))


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def paged_decode_attention(
    q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window=0
) -> torch.Tensor:
    """One query token per row against its blocks; rows with seq_len 0 give zeros."""
    batch, heads, dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    keys = k_cache[block_tables].flatten(1, 2)  # (B, L, Hkv, D)
    values = v_cache[block_tables].flatten(1, 2)
    group = heads // kv_heads
    keys = keys.repeat_interleave(group, dim=2).float()
    values = values.repeat_interleave(group, dim=2).float()
    scores = torch.einsum("bhd,blhd->bhl", q.float(), keys) * scale
    pos = torch.arange(keys.shape[1], device=q.device)
    last = (seq_lens - 1).unsqueeze(1)
    valid = pos.unsqueeze(0) <= last
    if sliding_window:
        valid &= pos.unsqueeze(0) > last - sliding_window
    scores = scores.masked_fill(~valid.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked (padding) rows: zeros
    del block_size
    return torch.einsum("bhl,blhd->bhd", probs, values).to(q.dtype)


def lora_apply(x, y, lora_a, lora_b, slot_ranks, token_slots, slice_offsets, buf=None) -> None:
    """``y[t, slice s] += (x[t] @ A[slot_t, s]ᵀ) @ B[slot_t, slice s]ᵀ``; slot -1 adds nothing.

    Ranks past a slot's own are zeros in the pool, so the padded product is exact.
    """
    del slot_ranks, buf
    keep = token_slots >= 0
    slots = torch.where(keep, token_slots, 0).long()
    a = lora_a[slots]  # (T, S, R, in)
    shrunk = torch.einsum("ti,tsri->tsr", x, a) * keep[:, None, None].to(x.dtype)
    b = lora_b[slots]  # (T, out, R)
    for s in range(len(slice_offsets) - 1):
        lo, hi = slice_offsets[s], slice_offsets[s + 1]
        y[:, lo:hi] += torch.einsum("tr,tor->to", shrunk[:, s], b[:, lo:hi])
