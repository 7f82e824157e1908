"""The forward's operators, each dispatched to a Triton kernel on CUDA or its torch twin.

The model code calls only these, so it reads the same on every device: on CUDA the fused
Triton kernels of ``hotmerge_kernels`` (capturable in a CUDA graph), elsewhere the torch twins
beside them (the CPU path, and the tests' oracle). ``use_triton`` can turn the kernels off
(``HOTMERGE_TRITON=0``), e.g. to compare the two paths on one GPU.
"""

from __future__ import annotations

import torch
from hotmerge_kernels.ops import fused as fused_ops
from hotmerge_kernels.ops import lora as lora_apply
from hotmerge_kernels.ops import paged_attention
from hotmerge_kernels.ops import prefill_attention as prefill_kernels

from hotmerge import settings

use_triton = settings.use_triton()


def triton_enabled(x: torch.Tensor) -> bool:
    """Whether operators on ``x`` run as Triton kernels."""
    return use_triton and x.is_cuda


def rms_norm(x, weight, eps, residual=None):
    """RMSNorm as transformers computes it; with ``residual``: normalise ``x + residual``,
    which is also written into ``residual`` (returned as the second value)."""
    fn = fused_ops.rms_norm if triton_enabled(x) else fused_ops.rms_norm_torch
    return fn(x, weight, eps, residual)


def rotary_and_cache(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping) -> None:
    """RoPE on q and k in place; roped k and v into the paged cache (slot -1: not written)."""
    fn = fused_ops.rotary_and_cache if triton_enabled(q) else fused_ops.rotary_and_cache_torch
    fn(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)


def silu_and_mul(gate_up):
    fn = fused_ops.silu_and_mul if triton_enabled(gate_up) else fused_ops.silu_and_mul_torch
    return fn(gate_up)


def paged_decode_attention(
    q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, kernel=None
):
    """One query token per row against its blocks; ``kernel`` is the runner's PagedAttention
    (its workspace preallocated, so the call can be captured)."""
    if kernel is not None and triton_enabled(q):
        return kernel.forward(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window)
    return paged_attention.paged_decode_attention_torch(
        q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window
    )


def prefill_attention(
    q, k_cache, v_cache, block_tables, query_start, query_lens, query_pos, scale, sliding_window
):
    """Each sequence's query tokens against its cached prefix and themselves (already in the
    cache), causal and windowed; one launch for the batch on CUDA."""
    fn = (
        prefill_kernels.paged_prefill_attention
        if triton_enabled(q)
        else prefill_kernels.paged_prefill_attention_torch
    )
    args = (q, k_cache, v_cache, block_tables, query_start, query_lens, query_pos, scale)
    return fn(*args, sliding_window)


def lora(x, y, lora_a, lora_b, slot_ranks, token_slots, slice_offsets, buf, meta=None) -> None:
    """``y[t, slice s] += (x[t]·A[slot_t, s]ᵀ)·B[slot_t, slice s]ᵀ`` (scaling in B); slot -1 adds
    nothing."""
    lora_apply.lora_apply(
        x,
        y,
        lora_a,
        lora_b,
        slot_ranks,
        token_slots,
        slice_offsets,
        buf,
        meta=meta,
        use_triton=triton_enabled(x),
    )
