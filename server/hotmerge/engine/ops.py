"""The forward's operators, each dispatched to a Triton kernel or its torch twin.

The model code calls only these, so it reads the same on every device. Which path runs is
``hotmerge_kernels.backend.use_triton``: on CUDA the fused Triton kernels of
``hotmerge_kernels.ops`` (capturable in a CUDA graph), elsewhere (or with ``HOTMERGE_TRITON=0``,
e.g. to compare the two paths on one GPU) their twins in ``hotmerge_kernels.ops.reference``, the
CPU path and the tests' oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hotmerge_kernels.backend import use_triton
from hotmerge_kernels.ops import fused, reference
from hotmerge_kernels.ops.lora import lora_apply
from hotmerge_kernels.ops.prefill_attention import paged_prefill_attention
from hotmerge_kernels.quant import QuantizedWeight
from hotmerge_kernels.quant import linear as quant_kernels
from hotmerge_kernels.quant import reference as quant_reference


def triton_enabled(x: torch.Tensor) -> bool:
    """Whether operators on ``x`` run as Triton kernels."""
    return use_triton(x)


def linear(x, weight: torch.Tensor | QuantizedWeight, bias=None):
    """A base projection: ``F.linear``, or ``qlinear`` when the weight is quantized
    (``--quantize``; on CUDA its Triton skinny GEMM for decode)."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    fn = quant_kernels.qlinear if use_triton(x) else quant_reference.qlinear
    return fn(x, weight, bias)


def rms_norm(x, weight, eps, residual=None):
    """RMSNorm as transformers computes it; with ``residual``: normalise ``x + residual``,
    which is also written into ``residual`` (returned as the second value)."""
    fn = fused.rms_norm if use_triton(x) else reference.rms_norm
    return fn(x, weight, eps, residual)


def rotary_and_cache(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping) -> None:
    """RoPE on q and k in place; roped k and v into the paged cache (slot -1: not written)."""
    fn = fused.rotary_and_cache if use_triton(q) else reference.rotary_and_cache
    fn(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)


def silu_and_mul(gate_up):
    fn = fused.silu_and_mul if use_triton(gate_up) else reference.silu_and_mul
    return fn(gate_up)


def paged_decode_attention(
    q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, kernel=None, out=None
):
    """One query token per row against its blocks; ``kernel`` is the runner's PagedAttention
    (its workspace preallocated, so the call can be captured)."""
    args = (q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window)
    if kernel is not None and use_triton(q):
        return kernel.forward(*args, out=out)
    return reference.paged_decode_attention(*args, out=out)


def prefill_attention(
    q,
    k_cache,
    v_cache,
    block_tables,
    query_start,
    query_lens,
    query_pos,
    scale,
    sliding_window,
    out=None,
):
    """Each sequence's query tokens against its cached prefix and themselves (already in the
    cache), causal and windowed; one launch for the batch on CUDA. Rows of ``out`` of no
    sequence's queries are left as they are."""
    fn = paged_prefill_attention if use_triton(q) else reference.paged_prefill_attention
    args = (q, k_cache, v_cache, block_tables, query_start, query_lens, query_pos, scale)
    return fn(*args, sliding_window, out=out)


def lora(x, y, lora_a, lora_b, slot_ranks, token_slots, slice_offsets, buf, meta=None) -> None:
    """``y[t, slice s] += (x[t]·A[slot_t, s]ᵀ)·B[slot_t, slice s]ᵀ`` (scaling in B); slot -1 adds
    nothing."""
    fn = lora_apply if use_triton(x) else reference.lora_apply
    fn(x, y, lora_a, lora_b, slot_ranks, token_slots, slice_offsets, buf, meta)
