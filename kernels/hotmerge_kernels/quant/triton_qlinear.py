"""Triton skinny GEMM over a quantized weight: ``y (M, N) = x (M, K) · dequantize(W)ᵀ (+ bias)``.

For decode (M up to 64 rows): memory-bound, so each program reads its ``BLOCK_N`` rows of the
packed weight once, dequantizes a ``(BLOCK_N, BLOCK_K)`` tile in registers (codes -> value ->
times scale, rounded to x's dtype as the torch twin rounds it), and accumulates in float32:
a multiply-and-sum for one row, a tensor-core ``tl.dot`` for 16 and more (rows padded). One
launch, no workspace, no host sync: capturable in a CUDA graph.
"""

from __future__ import annotations

import triton
import triton.language as tl

from hotmerge_kernels.backend import INTERPRETING

# Format ids (constexpr FMT).
NF4, INT4, INT8, FP8 = 0, 1, 2, 3


def _configs() -> list[triton.Config]:
    if INTERPRETING:  # one small config: the interpreter runs every candidate
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 128}, num_warps=4)]
    # Few candidates: a step's warm-up tunes every (row bucket, N, K) of the model.
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in (
            (16, 128, 4, 3),
            (16, 256, 4, 3),
            (32, 128, 4, 3),
            (32, 256, 4, 4),
            (32, 256, 8, 3),
            (64, 128, 4, 3),
            (64, 128, 8, 4),
            (64, 256, 8, 3),
            (128, 128, 8, 3),
        )
    ]


@triton.jit
def _unpack4(packed_ptr, offs_n, k0, K, mask_n, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_N, BLOCK_K) 4-bit codes (int32) of columns k0.. of rows offs_n; two per byte, the
    even column in the high nibble."""
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    ptrs = packed_ptr + offs_n[:, None].to(tl.int64) * (K // 2) + offs_b[None, :]
    b = tl.load(ptrs, mask=mask_n[:, None] & (offs_b < K // 2)[None, :], other=0).to(tl.int32)
    codes = tl.join(b >> 4, b & 0xF)  # (BLOCK_N, BLOCK_K // 2, 2): even, odd
    return tl.reshape(codes, (BLOCK_N, BLOCK_K))


@triton.jit
def _dequant_tile(
    w_ptr,
    s_ptr,
    z_ptr,
    code_ptr,
    q2_ptr,
    s2_ptr,
    offset_ptr,
    offs_n,
    k0,
    K,
    mask_n,
    FMT: tl.constexpr,
    DOUBLE: tl.constexpr,
    GROUP: tl.constexpr,
    FP8_BYTES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The float32 weight tile (BLOCK_N, BLOCK_K) at columns k0.."""
    if FMT == 0 or FMT == 1:  # nf4 / int4: per-group scales along K
        # One scale load per group, broadcast over its GROUP columns (BLOCK_K % GROUP == 0).
        NG: tl.constexpr = BLOCK_K // GROUP
        codes = tl.reshape(
            _unpack4(w_ptr, offs_n, k0, K, mask_n, BLOCK_N, BLOCK_K), (BLOCK_N, NG, GROUP)
        )
        offs_g = k0 // GROUP + tl.arange(0, NG)
        g = offs_n[:, None].to(tl.int64) * (K // GROUP) + offs_g[None, :]
        gmask = mask_n[:, None] & (offs_g < K // GROUP)[None, :]
        if FMT == 0:
            if DOUBLE:  # bitsandbytes' double quantization: code2[q] * absmax2 + offset
                q2 = tl.load(q2_ptr + g, mask=gmask, other=0).to(tl.int32)
                absmax2 = tl.load(s2_ptr + g // 256, mask=gmask, other=0.0)
                scale = tl.load(code_ptr + 16 + q2) * absmax2 + tl.load(offset_ptr)
            else:
                scale = tl.load(s_ptr + g, mask=gmask, other=0.0)
            w = tl.load(code_ptr + codes) * scale[:, :, None]
        else:
            scale = tl.load(s_ptr + g, mask=gmask, other=0.0)
            zero = tl.load(z_ptr + g, mask=gmask, other=0).to(tl.int32)
            w = (codes - zero[:, :, None]).to(tl.float32) * scale[:, :, None]
        w = tl.reshape(w, (BLOCK_N, BLOCK_K))
    else:  # int8 / fp8: per-output-channel scales
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_n[:, None] & (offs_k < K)[None, :]
        ptrs = w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
        if FMT == 3 and FP8_BYTES:  # the interpreter has no fp8: bytes through a value table
            q = tl.load(code_ptr + 272 + tl.load(ptrs, mask=mask, other=0).to(tl.int32))
        elif FMT == 3:
            q = tl.load(ptrs, mask=mask, other=0.0)
        else:
            q = tl.load(ptrs, mask=mask, other=0)
        scale = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
        w = q.to(tl.float32) * scale[:, None]
    return w


@triton.autotune(configs=_configs(), key=["BLOCK_M", "N", "K", "FMT", "DOUBLE"])
@triton.jit
def qlinear_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    code_ptr,
    q2_ptr,
    s2_ptr,
    offset_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_ym,
    FMT: tl.constexpr,
    DOUBLE: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid (N tiles, M tiles); columns past K read as zeros."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
        x = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
        w = _dequant_tile(
            w_ptr, s_ptr, z_ptr, code_ptr, q2_ptr, s2_ptr, offset_ptr,
            offs_n, k0, K, mask_n, FMT, DOUBLE, GROUP, INTERPRET, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        w = w.to(x.dtype)  # the twin's rounding: the dequantized weight in x's dtype
        if BLOCK_M == 1:
            acc += tl.sum(x.to(tl.float32) * w.to(tl.float32), axis=1)[None, :]
        elif x.dtype == tl.float32 or INTERPRET:  # the interpreter's bf16 dot is wrong
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def dequantize_kernel(
    w_ptr,
    s_ptr,
    z_ptr,
    code_ptr,
    q2_ptr,
    s2_ptr,
    offset_ptr,
    out_ptr,
    N,
    K,
    FMT: tl.constexpr,
    DOUBLE: tl.constexpr,
    GROUP: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The whole weight (N, K) in out's dtype (prefill: then one tensor-core GEMM); grid
    (N tiles, K tiles)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    w = _dequant_tile(
        w_ptr, s_ptr, z_ptr, code_ptr, q2_ptr, s2_ptr, offset_ptr,
        offs_n, k0, K, mask_n, FMT, DOUBLE, GROUP, INTERPRET, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    ptrs = out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    mask = mask_n[:, None] & (offs_k < K)[None, :]
    tl.store(ptrs, w.to(out_ptr.dtype.element_ty), mask=mask)


__all__ = ["FP8", "INT4", "INT8", "NF4", "dequantize_kernel", "qlinear_kernel"]
