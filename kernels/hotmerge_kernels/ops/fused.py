"""Fused elementwise kernels of a Llama-family decode step (torch twins: ``reference``).

- ``rms_norm``: [residual add, then] RMSNorm of each row; also per head (Qwen3's q_norm/k_norm).
- ``rotary_and_cache``: rotate-half RoPE on q and k in place, and the roped k and v written into
  the paged KV cache at ``slot_mapping`` (-1: not written).
- ``silu_and_mul``: ``silu(gate) * up`` from the fused ``[gate | up]`` projection.

Each is one launch, allocates nothing when its output buffers are given, never syncs with the
host (so it can be captured in a CUDA graph), and does nothing for T = 0. Tensors may be strided
views (a slice of a fused qkv output) as long as their last dimension is contiguous.

Numerics: float32 arithmetic, rounded to the storage dtype exactly where transformers' eager
modules round (every bf16/fp16 torch op computes in float32 and rounds its result). The twins
run transformers' ops (LlamaRMSNorm, apply_rotary_pos_emb, LlamaMLP's ``act_fn(gate) * up``) and
equal them bit for bit in bf16/fp16; the kernels differ only where float32 reduction order or
exp ulps move a value across a rounding boundary (RoPE and the cache writes: never).
The twins in ``reference`` have the same names, signatures and in-place effects; they are the
oracles of the tests and the eager baseline of ``benchmarks/fused_ops.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hotmerge_kernels.ops import pdl
from hotmerge_kernels.ops.reference import check_rotary, check_silu

ROTARY_WARPS = 1  # a (token, head) program holds head_dim / 2 pairs: 64 at head_dim 128
SILU_BLOCK = 1024
SILU_WARPS = 4


def _check_rows(x: torch.Tensor, name: str) -> None:
    if x.dim() not in (2, 3) or x.stride(-1) != 1:
        raise ValueError(f"{name}: want (rows, H) or (T, heads, H) with a contiguous last dim")


def _strides(x: torch.Tensor) -> tuple[int, int]:
    """(token, head) strides of a (T, H) or (T, heads, H) tensor; a 2-D tensor has one head."""
    return (x.stride(0), x.stride(1)) if x.dim() == 3 else (x.stride(0), 0)


# ---------------------------------------------------------------------------------------------
# RMSNorm


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr,
    heads, H, eps,
    x_st, x_sh, r_st, r_sh, o_st, o_sh,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    t = row // heads
    h = row % heads
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + t * x_st + h * x_sh + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        res = res_ptr + t * r_st + h * r_sh + cols
        # The sum is a hidden state of the model dtype: rounded before it is stored and normed.
        s = (x + tl.load(res, mask=mask, other=0.0).to(tl.float32)).to(res_ptr.dtype.element_ty)
        tl.store(res, s, mask=mask)
        x = s.to(tl.float32)
    variance = tl.sum(x * x, axis=0) / H
    # transformers rounds the normalised row to the input dtype before the weight multiplies it.
    normed = (x * tl.math.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * o_st + h * o_sh + cols, w * normed, mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LlamaRMSNorm of each row of ``x`` ((T, H), or (T, heads, H) normed per head), weight (H,).

    With ``residual`` (x's shape): ``s = x + residual`` rounded to the dtype is written into
    ``residual`` IN PLACE, and ``(norm(s), residual)`` is returned. ``out`` may be ``x`` itself
    (in place) but not ``residual``; without it a new tensor is allocated. The weight is in the
    model dtype, as transformers loads it; the output takes ``out``'s (default ``x``'s) dtype.
    """
    _check_rows(x, "x")
    H = x.shape[-1]
    if weight.shape != (H,) or not weight.is_contiguous():
        raise ValueError(f"weight: want a contiguous ({H},) tensor, got {tuple(weight.shape)}")
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _check_rows(out, "out")
    if residual is not None:
        _check_rows(residual, "residual")
        if residual.shape != x.shape or (out.numel() and out.data_ptr() == residual.data_ptr()):
            raise ValueError("residual: want x's shape, and not to be out")
    if out.shape != x.shape:
        raise ValueError(f"out: want {tuple(x.shape)}, got {tuple(out.shape)}")
    rows = x.shape[0] * (x.shape[1] if x.dim() == 3 else 1)
    if rows > 0:
        block = triton.next_power_of_2(H)
        res = residual if residual is not None else x  # unread when HAS_RESIDUAL is off
        _rms_norm_kernel[(rows,)](
            x, res, weight, out,
            x.shape[1] if x.dim() == 3 else 1, H, eps,
            *_strides(x), *_strides(res), *_strides(out),
            HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=min(max(block // 512, 1), 16), **pdl.launch_options(x.device),
        )  # fmt: skip
    return out if residual is None else (out, residual)


# ---------------------------------------------------------------------------------------------
# Rotary embedding + paged KV cache write


@triton.jit
def _rotate(row_ptr, d, mask, half, cos, sin):
    """Rotate-half RoPE of one head row in place; returns the two roped halves (rounded).

    transformers computes ``x * cos + rotate_half(x) * sin`` in the model dtype: each product
    rounds, then the sum. ``cos``/``sin`` arrive already rounded to that dtype.
    """
    dtype = row_ptr.dtype.element_ty
    x1 = tl.load(row_ptr + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row_ptr + half + d, mask=mask, other=0.0).to(tl.float32)
    o1 = ((x1 * cos).to(dtype).to(tl.float32) - (x2 * sin).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)).to(dtype)
    tl.store(row_ptr + d, o1, mask=mask)
    tl.store(row_ptr + half + d, o2, mask=mask)
    return o1, o2


@triton.jit
def _rotary_cache_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr,
    num_heads, half, block_size,
    q_st, q_sh, k_st, k_sh, v_st, v_sh, cos_st, sin_st,
    kc_sb, kc_so, kc_sh, vc_sb, vc_so, vc_sh,
    WRITE_CACHE: tl.constexpr, HALF_BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program (t, h): q head h for h < num_heads, else kv head h - num_heads (k, cache, v)."""
    pdl.enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    d = tl.arange(0, HALF_BLOCK)
    mask = d < half
    dtype = q_ptr.dtype.element_ty
    pos = tl.load(pos_ptr + t).to(tl.int64)
    # transformers casts the float32 cos/sin to the model dtype before using them.
    cos = tl.load(cos_ptr + pos * cos_st + d, mask=mask, other=0.0).to(dtype).to(tl.float32)
    sin = tl.load(sin_ptr + pos * sin_st + d, mask=mask, other=0.0).to(dtype).to(tl.float32)
    if h < num_heads:
        _rotate(q_ptr + t * q_st + h * q_sh, d, mask, half, cos, sin)
    else:
        j = h - num_heads
        k1, k2 = _rotate(k_ptr + t * k_st + j * k_sh, d, mask, half, cos, sin)
        if WRITE_CACHE:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            # slot broadcast to the row first: the Triton interpreter rejects a scalar in a mask.
            write = mask & (tl.zeros([HALF_BLOCK], tl.int64) + slot >= 0)
            slot = tl.maximum(slot, 0)  # padding rows (-1) keep an in-range, unused address
            block = slot // block_size
            offset = slot % block_size
            kc = kc_ptr + block * kc_sb + offset * kc_so + j * kc_sh
            tl.store(kc + d, k1, mask=write)
            tl.store(kc + half + d, k2, mask=write)
            v = v_ptr + t * v_st + j * v_sh
            vc = vc_ptr + block * vc_sb + offset * vc_so + j * vc_sh
            tl.store(vc + d, tl.load(v + d, mask=mask), mask=write)
            tl.store(vc + half + d, tl.load(v + half + d, mask=mask), mask=write)


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
    """RoPE on q (T, num_heads, D) and k (T, num_kv_heads, D) IN PLACE; then, given a cache,
    the roped k and v (T, num_kv_heads, D) are written at ``slot_mapping`` (T,) int (flat
    ``block * block_size + offset``; -1 writes nothing) of ``k_cache``/``v_cache``
    (num_blocks, block_size, num_kv_heads, D). ``positions`` (T,) int index ``cos``/``sin``
    (max_positions, D / 2) float32 (attention scaling included). With ``k_cache=None`` only
    q and k are roped; v, v_cache and slot_mapping are ignored.
    """
    check_rotary(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)
    T, num_heads, head_dim = q.shape
    if T == 0:
        return
    cache = k_cache is not None
    kc, vc = (k_cache, v_cache) if cache else (k, k)  # unread without the cache
    vs = v if cache else k
    _rotary_cache_kernel[(T, num_heads + k.shape[1])](
        q, k, vs, positions, cos, sin, kc, vc, slot_mapping if cache else positions,
        num_heads, head_dim // 2, kc.shape[1] if cache else 1,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), vs.stride(0), vs.stride(1),
        cos.stride(0), sin.stride(0),
        *(kc.stride()[:3] if cache else (0, 0, 0)), *(vc.stride()[:3] if cache else (0, 0, 0)),
        WRITE_CACHE=cache, HALF_BLOCK=triton.next_power_of_2(head_dim // 2),
        num_warps=ROTARY_WARPS, **pdl.launch_options(q.device),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# SiLU and mul


@triton.jit
def _silu_and_mul_kernel(
    gu_ptr, out_ptr, inter, gu_st, o_st, BLOCK: tl.constexpr, PDL: tl.constexpr
):
    pdl.enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(gu_ptr + t * gu_st + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + t * gu_st + inter + cols, mask=mask, other=0.0).to(tl.float32)
    # torch's silu, x / (1 + exp(-x)), rounded to the dtype before the multiply, as act_fn(gate).
    act = (gate / (1.0 + tl.exp(-gate))).to(gu_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + t * o_st + cols, act * up, mask=mask)


def silu_and_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up`` (T, 2 * I) = [gate | up] into ``out`` (T, I)."""
    inter = check_silu(gate_up, out)
    T = gate_up.shape[0]
    if out is None:
        out = torch.empty((T, inter), dtype=gate_up.dtype, device=gate_up.device)
    if T > 0 and inter > 0:
        _silu_and_mul_kernel[(T, triton.cdiv(inter, SILU_BLOCK))](
            gate_up, out, inter, gate_up.stride(0), out.stride(0),
            BLOCK=SILU_BLOCK, num_warps=SILU_WARPS, **pdl.launch_options(gate_up.device),
        )  # fmt: skip
    return out
