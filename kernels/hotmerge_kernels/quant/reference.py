"""The torch twins of the quantized-weight kernels (``linear``): same names, same signatures.

They run where ``hotmerge_kernels.backend.use_triton`` says torch (off CUDA, or with
``HOTMERGE_TRITON=0``) and are the tests' oracle. This module imports no Triton. Numerics: the
weight is dequantized in float32 and rounded once to the target dtype, then ``F.linear``. The
skinny GEMM rounds its dequantized NF4 / int4 tile the same way from 2 rows up, so there the
twins agree up to summation order. For one row it multiplies the float32 weight unrounded, and
int8 / fp8 multiply their exact codes and scale the sums per channel: within a rounding of x's
dtype per weight of the twin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hotmerge_kernels.quant.formats import (
    NF4_BLOCK,
    Fp8Weight,
    Int4Weight,
    Int8Weight,
    Nf4Weight,
    QuantizedWeight,
    nf4_code,
    unpack_nibbles,
)


def qlinear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x (..., K) · Wᵀ + bias``: dequantize into x's dtype, then ``F.linear``."""
    return F.linear(x, dequantize(qw, x.dtype), bias)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight ``(N, K)`` the quantized one stands for, in ``dtype`` (default: the original):
    computed in float32, rounded once."""
    n, k = qw.shape
    dtype = dtype or qw.dtype
    if isinstance(qw, Nf4Weight):
        values = nf4_code(qw.packed.device)[unpack_nibbles(qw.packed).long()]
        w = values.view(-1, NF4_BLOCK) * qw.block_scales()[:, None]
    elif isinstance(qw, Int4Weight):
        codes = unpack_nibbles(qw.packed).float().view(n, k // qw.group, qw.group)
        w = (codes - qw.zero.float()[..., None]) * qw.scale[..., None]
    elif isinstance(qw, Int8Weight | Fp8Weight):
        w = qw.qweight.float() * qw.scale[:, None]
    else:
        raise TypeError(f"dequantize: not a quantized weight: {type(qw).__name__}")
    return w.reshape(n, k).to(dtype)


__all__ = ["dequantize", "qlinear"]
