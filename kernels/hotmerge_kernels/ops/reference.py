"""The torch twins of the serving operators' Triton kernels, and the checks both share.

A twin has its kernel's name and signature (``reference.rms_norm`` is the twin of
``fused.rms_norm``) and the same in-place effects; it is the engine's path off CUDA (or with
``HOTMERGE_TRITON=0``; ``hotmerge_kernels.backend``) and the tests' oracle. This module imports no
Triton. Numerics, per operator (the kernels' module docstrings hold the contracts):

- ``rms_norm``, ``rotary_and_cache``, ``silu_and_mul`` (``fused``): transformers' own ops
  (LlamaRMSNorm, apply_rotary_pos_emb, LlamaMLP's ``act_fn(gate) * up``), bit for bit.
- ``paged_decode_attention`` (``paged_attention``): every row's blocks gathered up to the longest
  length, masked, softmax in float32; ``write_kv`` writes new K/V by flat slot.
- ``paged_prefill_attention`` (``prefill_attention``): one masked SDPA per sequence over its
  gathered prefix, in q's dtype.
- ``lora_shrink``, ``lora_expand``, ``lora_apply`` (``lora``): grouped by adapter slot (one pair
  of matmuls per distinct slot, over all its tokens and slices), never a loop per token. They
  read only the first ``slot_ranks[slot]`` rank columns and follow the kernels' numerics:
  float32 accumulation; expand sums ``buf``'s splits in order ``0, 1, ...`` and rounds the sum
  to the weights' dtype (the kernel feeds it to a tensor-core dot in that dtype); ``y`` is
  updated once, in its dtype. Shrink writes the whole product into split 0 and zeros into the
  others (the kernel's partials of ``in``'s ranges have the same sum, in another order).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Fused elementwise ops (fused.py)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The twin of ``rms_norm``: transformers' residual add and LlamaRMSNorm, op for op."""
    if residual is not None:
        residual.copy_(x + residual)
        x = residual
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    normed = weight * (h * torch.rsqrt(variance + eps)).to(input_dtype)
    if out is None:
        out = normed.to(input_dtype)
    else:
        out.copy_(normed)
    return out if residual is None else (out, residual)


def check_rotary(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping) -> None:
    T, _, head_dim = q.shape
    for name, x in (("q", q), ("k", k)) + ((("v", v),) if k_cache is not None else ()):
        if x.dim() != 3 or x.shape[0] != T or x.shape[2] != head_dim or x.stride(2) != 1:
            raise ValueError(f"{name}: want (T, heads, {head_dim}) with a contiguous last dim")
    if head_dim % 2 or cos.shape[1:] != (head_dim // 2,) or sin.shape != cos.shape:
        raise ValueError(f"cos, sin: want (max_positions, {head_dim // 2}); head_dim even")
    if cos.stride(1) != 1 or sin.stride(1) != 1 or positions.shape != (T,):
        raise ValueError("cos, sin: want a contiguous last dim; positions: want (T,)")
    if k_cache is None:
        return
    want = (k.shape[1], head_dim)
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c is None or c.dim() != 4 or c.shape[2:] != want or c.stride(3) != 1:
            raise ValueError(f"{name}: want (num_blocks, block_size, {want[0]}, {head_dim})")
    if v_cache.shape[:2] != k_cache.shape[:2] or slot_mapping is None:
        raise ValueError("v_cache: want k_cache's blocks; slot_mapping: required with a cache")
    if v.shape != k.shape or slot_mapping.shape != (T,):
        raise ValueError("v: want k's shape; slot_mapping: want (T,)")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
) -> None:
    """The twin of ``rotary_and_cache``: transformers' apply_rotary_pos_emb, then the cache
    write, with no host sync (it runs inside the benchmark's CUDA graph)."""
    check_rotary(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)
    c = cos[positions].to(q.dtype)
    s = sin[positions].to(q.dtype)
    c = torch.cat((c, c), dim=-1).unsqueeze(1)
    s = torch.cat((s, s), dim=-1).unsqueeze(1)
    q.copy_(q * c + _rotate_half(q) * s)
    k.copy_(k * c + _rotate_half(k) * s)
    if k_cache is None or q.shape[0] == 0:
        return
    # Padding rows (-1) must write nothing, without a sync to drop them: each is pointed at the
    # slot of the first valid row and carries that row's values, so duplicate writes agree.
    # With no valid row at all, every row rewrites slot 0 with what it holds.
    valid = slot_mapping >= 0
    first = torch.argmax(valid.to(torch.int32)).view(1)  # 1-D: a 0-d index would sync
    slots = torch.where(valid, slot_mapping, slot_mapping[first].clamp(min=0))
    rows = torch.where(valid, torch.arange(len(valid), device=valid.device), first)
    for x, cache in ((k, k_cache), (v, v_cache)):
        flat = cache.view(-1, *cache.shape[2:])
        new = torch.where(valid[first], x[rows].to(cache.dtype), flat[slots])
        flat.index_copy_(0, slots, new)


def check_silu(gate_up: torch.Tensor, out: torch.Tensor | None) -> int:
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError("gate_up: want (T, 2 * I) with a contiguous last dim")
    inter = gate_up.shape[1] // 2
    if out is not None and (out.shape != (gate_up.shape[0], inter) or out.stride(1) != 1):
        raise ValueError(f"out: want ({gate_up.shape[0]}, {inter}) with a contiguous last dim")
    return inter


def silu_and_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The twin of ``silu_and_mul``: LlamaMLP's ``act_fn(gate_proj(x)) * up_proj(x)``."""
    check_silu(gate_up, out)
    gate, up = gate_up.chunk(2, dim=-1)
    y = F.silu(gate) * up
    if out is None:
        return y
    return out.copy_(y)


# ---------------------------------------------------------------------------------------------
# Paged decode attention (paged_attention.py)


def check_cache(q, k_cache, v_cache) -> None:
    """q ``(tokens, heads, head_dim)`` against the paged caches (decode and prefill alike)."""
    _, num_heads, head_dim = q.shape
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError("k_cache and v_cache differ in shape or dtype")
    if k_cache.shape[3] != head_dim or num_heads % k_cache.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} does not fit cache {tuple(k_cache.shape)}")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("head_dim must be the contiguous dimension of q and the caches")


def check_decode_attention(q, k_cache, v_cache, block_tables, seq_lens) -> None:
    """Shape and dtype contract (host metadata only: no sync)."""
    check_cache(q, k_cache, v_cache)
    batch = q.shape[0]
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError("block_tables and seq_lens must be int32")
    if block_tables.shape[0] != batch or seq_lens.shape != (batch,):
        raise ValueError("block_tables / seq_lens rows differ from q's batch")


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch twin: gather every row's blocks up to the longest length, mask, softmax in float32."""
    check_decode_attention(q, k_cache, v_cache, block_tables, seq_lens)
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if out is None:
        out = torch.empty_like(q)
    max_len = int(seq_lens.max()) if batch else 0  # one host sync: this is the eager path
    if max_len == 0:
        return out.zero_()
    lens = seq_lens.long()[:, None]
    pos = torch.arange(max_len, device=q.device)
    live = pos < lens  # (B, T)
    if sliding_window > 0:
        live &= pos >= lens - sliding_window
    n_blocks = -(-max_len // block_size)
    blocks = block_tables[:, :n_blocks].long()
    used = torch.arange(n_blocks, device=q.device) * block_size < lens
    blocks = torch.where(used, blocks, 0)  # entries past a row's length may hold anything

    def gather(cache: torch.Tensor) -> torch.Tensor:  # (B, kv heads, T, D)
        return cache[blocks].flatten(1, 2)[:, :max_len].float().transpose(1, 2)

    group = num_heads // num_kv_heads
    qg = q.float().view(batch, num_kv_heads, group, head_dim)
    scores = (qg @ gather(k_cache).transpose(2, 3)) * scale  # (B, kv heads, group, T)
    scores = scores.masked_fill(~live[:, None, None, :], float("-inf"))  # drops NaN keys too
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # padding rows: all -inf -> zeros
    v = torch.where(live[:, None, :, None], gather(v_cache), 0.0)  # dead slots may hold NaN
    res = probs @ v  # (B, kv heads, group, D)
    out.copy_(res.view(batch, num_heads, head_dim))
    return out


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write ``k``, ``v`` ``(T, num_kv_heads, head_dim)`` at flat slots (block * block_size +
    offset) of the caches; slot -1 skips the token. Boolean indexing syncs: eager path only."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = k_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = v[keep].to(v_cache.dtype)


# ---------------------------------------------------------------------------------------------
# Paged prefill attention (prefill_attention.py)


def check_prefill_attention(
    q, k_cache, v_cache, block_tables, query_start, query_lens, query_pos
) -> None:
    """Shape and dtype contract (host metadata only: no sync)."""
    check_cache(q, k_cache, v_cache)
    per_seq = (block_tables, query_start, query_lens, query_pos)
    if any(t.dtype != torch.int32 for t in per_seq):
        raise ValueError("block_tables, query_start, query_lens and query_pos must be int32")
    seqs = block_tables.shape[0]
    if any(t.shape != (seqs,) for t in per_seq[1:]):
        raise ValueError("query_start / query_lens / query_pos must be (S,) like block_tables")


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    query_lens: torch.Tensor,
    query_pos: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch twin: per sequence, the keys its queries see gathered from the cache (from the
    first query's window on), one masked SDPA in q's dtype (as transformers computes it)."""
    check_prefill_attention(q, k_cache, v_cache, block_tables, query_start, query_lens, query_pos)
    _, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    per_seq = zip(query_start.tolist(), query_lens.tolist(), query_pos.tolist(), strict=True)
    for s, (first, length, start) in enumerate(per_seq):  # .tolist(): the eager path syncs
        if length == 0:
            continue
        total = start + length
        first_key = max(start - sliding_window + 1, 0) if sliding_window > 0 else 0
        k_pos = torch.arange(first_key, total, device=q.device)
        blocks = block_tables[s].long()[k_pos // block_size]
        keys = k_cache[blocks, k_pos % block_size].repeat_interleave(group, dim=1)
        values = v_cache[blocks, k_pos % block_size].repeat_interleave(group, dim=1)
        q_pos = torch.arange(start, total, device=q.device)[:, None]
        mask = k_pos[None, :] <= q_pos
        if sliding_window > 0:
            mask &= k_pos[None, :] > q_pos - sliding_window
        o = F.scaled_dot_product_attention(
            q[first : first + length].transpose(0, 1),  # (H, L, D)
            keys.transpose(0, 1),
            values.transpose(0, 1),
            attn_mask=mask,
            scale=scale,
        )
        out[first : first + length] = o.transpose(0, 1)
    return out


# ---------------------------------------------------------------------------------------------
# Multi-LoRA shrink / expand (lora.py)


def _slot_groups(
    token_slots: torch.Tensor, slot_ranks: torch.Tensor
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(slot, rank, token rows) for every distinct slot >= 0 of nonzero rank (syncs: CPU path)."""
    slots = token_slots.long()
    for slot in torch.unique(slots[slots >= 0]).tolist():
        rank = int(slot_ranks[slot])
        if rank > 0:
            yield slot, rank, (slots == slot).nonzero().squeeze(1)


def lora_shrink(
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


def lora_expand(
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


def lora_apply(
    x: torch.Tensor,
    y: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slot_ranks: torch.Tensor,
    token_slots: torch.Tensor,
    slice_offsets: Sequence[int],
    buf: torch.Tensor,
    meta: object = None,
) -> None:
    """``y += LoRA(x)`` for a projection group: shrink into ``buf``, expand into ``y``."""
    lora_shrink(x, lora_a, slot_ranks, token_slots, buf)
    lora_expand(buf, lora_b, slot_ranks, token_slots, y, slice_offsets)
