"""The quantized-weight Triton entry points: ``qlinear`` and ``dequantize``.

Their torch twins (same names and signatures) are in ``reference``; ``hotmerge/engine/ops.py``
picks one or the other with ``backend.use_triton``. ``qlinear`` takes the kernel that fits the
call:

- up to ``SKINNY_ROWS`` rows (decode): the Triton skinny GEMM (``triton_qlinear``), which reads
  the packed weight once; an int4 weight at one row: its own GEMV (``triton_int4_gemv``),
  with two thirds of the instructions a weight;
- more rows (prefill): compute-bound, so ``dequantize`` into x's dtype (a Triton kernel, no
  float32 copy of the weight) and let cuBLAS multiply;
- fp8 with ``HOTMERGE_FP8_MATMUL=scaled_mm`` (``backend.FP8_MATMUL``): every size through
  ``torch._scaled_mm`` on the fp8 tensor cores, the activations quantized per row on the fly
  (W8A8: not weight-only, so its numerics differ from the twin by the activation rounding).
  The default is weight-only.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from hotmerge_kernels import backend
from hotmerge_kernels.backend import INTERPRETING
from hotmerge_kernels.ops.pdl import launch_options
from hotmerge_kernels.quant import triton_qlinear as tq
from hotmerge_kernels.quant.formats import (
    FP8_MAX,
    NF4_BLOCK,
    Fp8Weight,
    Int4Weight,
    Int8Weight,
    Nf4Weight,
    QuantizedWeight,
    dynamic_code,
    nf4_code,
)
from hotmerge_kernels.quant.triton_int4_gemv import int4_gemv_kernel

SKINNY_ROWS = 64


def qlinear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x (..., K) · Wᵀ + bias`` with ``W`` given quantized; the result in x's dtype."""
    if isinstance(qw, Fp8Weight) and backend.FP8_MATMUL == "scaled_mm":
        return fp8_scaled_mm(x, qw, bias)
    rows = x.numel() // x.shape[-1]
    if rows <= SKINNY_ROWS:
        return qlinear_skinny(x, qw, bias)
    return F.linear(x, dequantize(qw, x.dtype), bias)


@functools.cache
def _code_table(device: torch.device) -> torch.Tensor:
    """The kernels' value table (offsets in ``triton_qlinear``): NF4's 16 values, bitsandbytes'
    256-value dynamic code (double quantization), then the 256 e4m3 values by byte (fp8 under
    the interpreter, which has no fp8 type)."""
    fp8 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    fp8 = torch.nan_to_num(fp8, nan=0.0).to(device)  # 0x7f/0xff are NaN; never produced
    return torch.cat([nf4_code(device), dynamic_code(device), fp8]).contiguous()


def qlinear_skinny(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None):
    """The skinny GEMM kernel: one launch, output allocated here (a graph's pool when
    captured), no host sync."""
    n, k = qw.shape
    if x.shape[-1] != k:
        raise ValueError(f"qlinear: x has {x.shape[-1]} features, the weight takes {k}")
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 1 and isinstance(qw, Int4Weight):
        _int4_gemv(x2, qw, bias, y)
        return y.view(*x.shape[:-1], n)
    code = _code_table(x.device)
    w, s, z, q2, s2, off = _pointers(qw, code)
    block_m = 1 if m == 1 else max(16, triton_next_pow2(m))
    block_m = min(block_m, SKINNY_ROWS)

    def grid(meta):
        return (-(-n // meta["BLOCK_N"]), -(-m // block_m))

    tq.qlinear_kernel[grid](
        x2, w, s, z, code, q2, s2, off,
        bias if bias is not None else s, y,
        m, n, k, x2.stride(0), y.stride(0),
        FMT=_FMT[type(qw)],
        DOUBLE=isinstance(qw, Nf4Weight) and qw.absmax is None,
        GROUP=qw.group if isinstance(qw, Int4Weight) else NF4_BLOCK,
        HAS_BIAS=bias is not None,
        INTERPRET=INTERPRETING,
        BLOCK_M=block_m,
        **(launch_options(x.device) if block_m == 1 else {"PDL": False}),
    )  # fmt: skip
    return y.view(*x.shape[:-1], n)


def _int4_gemv(x: torch.Tensor, qw: Int4Weight, bias: torch.Tensor | None, y: torch.Tensor):
    n = qw.shape[0]
    if x.data_ptr() % 4:  # the kernel reads bf16 x a 32-bit word at a time
        x = x.clone()

    def grid(meta):
        return (-(-n // meta["BLOCK_N"]),)

    int4_gemv_kernel[grid](
        x, qw.packed, qw.scale, qw.zero, bias if bias is not None else qw.scale, y,
        n, qw.shape[1],
        GROUP=qw.group,
        HAS_BIAS=bias is not None,
        INTERPRET=INTERPRETING,
        **launch_options(x.device),
    )  # fmt: skip


_FMT = {Nf4Weight: tq.NF4, Int4Weight: tq.INT4, Int8Weight: tq.INT8, Fp8Weight: tq.FP8}


def _pointers(qw: QuantizedWeight, code: torch.Tensor):
    """(codes, scales, zeros, qabsmax, absmax2, offset) for the kernel; unused ones point at
    a tensor the kernel never reads."""
    if isinstance(qw, Nf4Weight):
        if qw.absmax is None:
            return qw.packed, code, code, qw.qabsmax, qw.absmax2, qw.offset.reshape(1)
        return qw.packed, qw.absmax, code, code, code, code
    if isinstance(qw, Int4Weight):
        return qw.packed, qw.scale, qw.zero, code, code, code
    if isinstance(qw, Fp8Weight) and INTERPRETING:
        return qw.qweight.view(torch.uint8), qw.scale, code, code, code, code
    if isinstance(qw, Int8Weight | Fp8Weight):
        return qw.qweight, qw.scale, code, code, code, code
    raise TypeError(f"qlinear: not a quantized weight: {type(qw).__name__}")


def dequantize(qw: QuantizedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight (N, K) in ``dtype`` (default: the original), one launch."""
    n, k = qw.shape
    dtype = dtype or qw.dtype
    out = torch.empty(n, k, dtype=dtype, device=qw.device)
    code = _code_table(qw.device)
    w, s, z, q2, s2, off = _pointers(qw, code)
    block_n, block_k = 32, 128
    tq.dequantize_kernel[(-(-n // block_n), -(-k // block_k))](
        w, s, z, code, q2, s2, off, out, n, k,
        FMT=_FMT[type(qw)],
        DOUBLE=isinstance(qw, Nf4Weight) and qw.absmax is None,
        GROUP=qw.group if isinstance(qw, Int4Weight) else NF4_BLOCK,
        INTERPRET=INTERPRETING,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
    )  # fmt: skip
    return out


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def fp8_scaled_mm(x: torch.Tensor, qw: Fp8Weight, bias: torch.Tensor | None = None):
    """fp8 tensor-core GEMM (``torch._scaled_mm``, row-wise scales): x quantized per row to
    e4m3 (its absmax / 448), the weight's per-channel scales applied in the epilogue."""
    n, k = qw.shape
    x2 = x.reshape(-1, k)
    x_scale = (x2.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    xq = (x2.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    y = torch._scaled_mm(
        xq,
        qw.qweight.t(),
        scale_a=x_scale,
        scale_b=qw.scale.view(1, n),
        bias=bias,
        out_dtype=x.dtype,
    )
    return y.view(*x.shape[:-1], n)


__all__ = [
    "SKINNY_ROWS",
    "dequantize",
    "fp8_scaled_mm",
    "qlinear",
    "qlinear_skinny",
]
