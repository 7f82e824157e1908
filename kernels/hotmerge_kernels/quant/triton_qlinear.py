"""Triton skinny GEMM over a quantized weight: ``y (M, N) = x (M, K) · dequantize(W)ᵀ (+ bias)``.

For decode (M up to 64 rows): each program reads its ``BLOCK_N`` rows of the packed weight once
and dequantizes a ``(BLOCK_N, BLOCK_K)`` tile in registers (codes -> value -> times scale). At
4 and 8 bits the instructions per weight bound it as much as the bytes do (an H100 issues about
3·10¹³ thread instructions a second: at 8 a weight, a 7B model's 6.5·10⁹ weights take 1.7 ms,
more than reading them at 4 bits), so each one counts:

- one row (batch 1; int4 has a GEMV of its own, ``triton_int4_gemv``): products summed
  elementwise into a 2-D float32 accumulator, reduced once at the end; the float32 weight is
  not rounded to x's dtype first (the twin rounds it: a conversion per weight, on a pipe an
  eighth as fast, would cost more than the weight's read).
  Small ``BLOCK_N`` tiles, so that N spreads over every SM;
- 16 to 64 rows (padded): a tensor-core ``tl.dot`` on the tile rounded to x's dtype, computed
  as ``yᵀ = W·xᵀ``: the weight tile is then the A operand, which Hopper's wgmma reads from
  registers, where it was dequantized (as B it would go through shared memory first, and a
  64-row weight tile fills wgmma's M while 16 to 64 rows of x fit its N);
- int8 / fp8 scale the sum by their per-channel scale, not each weight, at every row count
  (their codes are exact in bf16);
- int8 and int4 codes become floats by the exponent trick (the code in the low mantissa bits
  of 2**23, minus 2**23: exact, and no int-to-float conversion, which runs on a pipe an eighth
  as fast as the float one: at one a weight, 16 a clock an SM, a 7B step's weights need 1.8 ms);
- NF4 looks each nibble up in its 16 values held in registers (``tl.gather``: a warp shuffle a
  lookup, no address arithmetic). Loads from tables in memory cost a 64-bit address a lookup,
  and tables of a byte's two values (1 KiB) make a warp's gather touch up to eight cache lines,
  each a pass of the load unit: with those, NF4's one-row decode ran at 17–22% of copy
  bandwidth on an H100.

One launch, no workspace, no host sync: capturable in a CUDA graph. On Hopper the one-row kernel
launches as a programmatic dependent (``ops/pdl.py``): its launch and ramp hide behind the tail
of the kernel before it. The tensor-core tiles launch plainly: on the H100, with them launched
as dependents too, 32-row steps were 0.7-1.6 ms slower than the lease before's without, while
the kernels alone had become faster (``benchmarks/results/gpu-checks-H100-2026-12-07-c``). The
likely cause: launched early, their few large programs (about one wave) are placed on whatever
SMs the kernel before leaves free, two to an SM there while other SMs wait. Not yet measured
side by side (``HOTMERGE_PDL=0`` turns every dependent launch off).
"""

from __future__ import annotations

import triton
import triton.language as tl

from hotmerge_kernels.backend import INTERPRETING
from hotmerge_kernels.ops import pdl

# Format ids (constexpr FMT).
NF4, INT4, INT8, FP8 = 0, 1, 2, 3
MAGIC = tl.constexpr(0x4B000000)  # 2.0**23's bits: adding an integer below 2**22 adds it
TWO23 = tl.constexpr(8388608.0)
# Offsets in the value table (``linear._code_table``): NF4's 16 values, the 256 of the double
# quantization's dynamic code, then e4m3's by byte.
DYNAMIC = tl.constexpr(16)
FP8_BY_BYTE = tl.constexpr(272)


def _configs() -> list[triton.Config]:
    """One row: few rows a program (4096 outputs make 256 to 1024 programs) and long K steps.
    16 to 64 rows: tensor-core tiles; the one-stage ones keep NF4's table lookups out of the
    software pipeline (which would stage every looked-up value through shared memory). Few
    candidates: a step's warm-up tunes every (row bucket, N, K) of the model."""
    if INTERPRETING:  # one small config: the interpreter runs every candidate
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 128}, num_warps=4)]
    gemv = [(4, 256, 2, 4), (8, 256, 4, 4), (8, 512, 4, 3), (16, 256, 4, 3), (16, 512, 8, 3)]
    dot = [(16, 128, 4, 3), (32, 128, 4, 3), (32, 256, 8, 4), (64, 128, 4, 3), (64, 128, 8, 4),
           (64, 256, 8, 3), (32, 128, 4, 1), (64, 128, 4, 1), (64, 256, 8, 1)]  # fmt: skip
    return [
        triton.Config(
            {"BLOCK_N": bn, "BLOCK_K": bk, "GEMV": rows == "gemv"}, num_warps=w, num_stages=stages
        )
        for rows, tiles in (("gemv", gemv), ("dot", dot))
        for bn, bk, w, stages in tiles
    ]


def _for_the_rows(configs, named_args, **kwargs):
    """The one-row tiles for one row, the tensor-core ones for more; whole 4-bit groups."""
    gemv = kwargs["BLOCK_M"] == 1
    group = kwargs.get("GROUP", 1)
    fits = [c for c in configs if c.kwargs.get("GEMV", gemv) == gemv
            and c.kwargs["BLOCK_K"] % group == 0]  # fmt: skip
    return fits or configs


@triton.jit
def _packed_bytes(packed_ptr, offs_n, k0, K, mask_n, BLOCK_K: tl.constexpr):
    """(BLOCK_N, BLOCK_K // 2) bytes (int32) of 4-bit codes, columns k0.. of rows offs_n; two
    codes a byte, the even column in the high nibble."""
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    ptrs = packed_ptr + offs_n[:, None].to(tl.int64) * (K // 2) + offs_b[None, :]
    b = tl.load(ptrs, mask=mask_n[:, None] & (offs_b < K // 2)[None, :], other=0)
    return b.to(tl.int32)


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
    SCALED: tl.constexpr = True,
):
    """The float32 weight tile (BLOCK_N, BLOCK_K) at columns k0..; int8 / fp8 without SCALED:
    the codes alone, their per-channel scale left to the caller (one multiply per row, not per
    weight)."""
    if FMT == 0 or FMT == 1:  # nf4 / int4: per-group scales along K
        # One scale load per group, broadcast over its GROUP columns (BLOCK_K % GROUP == 0).
        NG: tl.constexpr = BLOCK_K // GROUP
        b = _packed_bytes(w_ptr, offs_n, k0, K, mask_n, BLOCK_K)
        hi, lo = b >> 4, b & 0xF
        if FMT == 0:  # the 16-value table in registers, looked up across the warp (shuffles)
            table = tl.broadcast_to(tl.load(code_ptr + tl.arange(0, 16))[None, :], (BLOCK_N, 16))
            pairs = tl.join(tl.gather(table, hi, axis=1), tl.gather(table, lo, axis=1))
        else:  # 2**23 + code by the exponent trick (no int-to-float conversion)
            pairs = tl.join(hi | MAGIC, lo | MAGIC).to(tl.float32, bitcast=True)
        codes = tl.reshape(pairs, (BLOCK_N, NG, GROUP))
        offs_g = k0 // GROUP + tl.arange(0, NG)
        g = offs_n[:, None].to(tl.int64) * (K // GROUP) + offs_g[None, :]
        gmask = mask_n[:, None] & (offs_g < K // GROUP)[None, :]
        if FMT == 0:
            if DOUBLE:  # bitsandbytes' double quantization: code2[q] * absmax2 + offset
                q2 = tl.load(q2_ptr + g, mask=gmask, other=0).to(tl.int32)
                absmax2 = tl.load(s2_ptr + g // 256, mask=gmask, other=0.0)
                scale = tl.load(code_ptr + DYNAMIC + q2) * absmax2 + tl.load(offset_ptr)
            else:
                scale = tl.load(s_ptr + g, mask=gmask, other=0.0)
            w = codes * scale[:, :, None]
        else:
            scale = tl.load(s_ptr + g, mask=gmask, other=0.0)
            zero = tl.load(z_ptr + g, mask=gmask, other=0).to(tl.float32) + TWO23
            w = (codes - zero[:, :, None]) * scale[:, :, None]  # (2**23 + c) - (2**23 + z): exact
        w = tl.reshape(w, (BLOCK_N, BLOCK_K))
    else:  # int8 / fp8: per-output-channel scales
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_n[:, None] & (offs_k < K)[None, :]
        ptrs = w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
        if FMT == 3 and FP8_BYTES:  # the interpreter has no fp8: bytes through a value table
            q = tl.load(code_ptr + FP8_BY_BYTE + tl.load(ptrs, mask=mask, other=0).to(tl.int32))
        elif FMT == 3:
            q = tl.load(ptrs, mask=mask, other=0.0)
        else:  # -128..127 + 2**23 + 128 by the exponent trick, exact
            q = tl.load(ptrs, mask=mask, other=0).to(tl.int32) + (MAGIC + 128)
            q = q.to(tl.float32, bitcast=True) - (TWO23 + 128.0)
        if SCALED:
            scale = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
            w = q.to(tl.float32) * scale[:, None]
        else:
            w = q.to(tl.float32)
    return w


@triton.autotune(
    configs=_configs(),
    key=["BLOCK_M", "N", "K", "FMT", "DOUBLE"],
    prune_configs_by={"early_config_prune": _for_the_rows},
)
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
    PDL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GEMV: tl.constexpr = False,  # the tile set (BLOCK_M == 1 picks the one-row ones)
):
    """Grid (N tiles, M tiles); columns past K read as zeros."""
    pdl.enter(PDL)  # x is the kernel before's output
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # one row: summed at the end
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # rows: yᵀ = W·xᵀ (see below)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
        x = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
        w = _dequant_tile(
            w_ptr, s_ptr, z_ptr, code_ptr, q2_ptr, s2_ptr, offset_ptr,
            offs_n, k0, K, mask_n, FMT, DOUBLE, GROUP, INTERPRET, BLOCK_N, BLOCK_K, SCALED=False,
        )  # fmt: skip
        if BLOCK_M == 1:
            acc_1 += x.to(tl.float32) * w
        else:
            w = w.to(x.dtype)  # the twin's rounding: the dequantized weight in x's dtype
            if x.dtype == tl.float32 or INTERPRET:  # the interpreter's bf16 dot is wrong
                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc,
                             input_precision="ieee")  # fmt: skip
            else:  # swapped, so the dequantized tile is wgmma's A operand, from registers
                acc_t = tl.dot(w, tl.trans(x), acc_t)
    if BLOCK_M == 1:
        acc += tl.sum(acc_1, axis=1)[None, :]
    else:  # zeros where the float32 / interpreter dot summed into acc
        acc += tl.trans(acc_t)
    if FMT == 2 or FMT == 3:  # the per-channel scale, left out of the tile
        acc *= tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
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
