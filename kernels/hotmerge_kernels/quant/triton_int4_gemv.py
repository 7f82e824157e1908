"""Triton one-row GEMV over an int4 weight: ``y (1, N) = x (1, K) · dequantize(W)ᵀ (+ bias)``.

Decode at batch 1 reads 4 bits a weight, so the instructions spent on each weight bound it as
much as the bytes do: at the generic kernel's 9 a weight (``triton_qlinear``), a 7B step's
6.5·10⁹ weights take about 2 ms of an H100's instruction issue, against 1.1 ms to read them.
Here the work a weight needs is about three instructions:

- the zero point and the scale leave the inner loop: a group's sum is
  ``scale · (Σ x·code − zero · Σ x)``, so the loop multiplies x by the bare 0..15 code;
- a byte's two codes become exact float16 values in packed registers by the magic-number trick
  (inline PTX: ``prmt`` spreads two bytes over two 16-bit lanes, one ``lop3`` keeps a nibble and
  ORs in the exponent of 64 (high nibble, bits 4..7 = units) or 1024 (low nibble, bits 0..3 =
  units), one ``sub.f16x2`` takes the magic away): 10 instructions for 8 weights, no
  int-to-float conversion;
- then one conversion to float32 and one FMA a weight, float32 sums; x (bf16) read as one
  32-bit word a pair of columns, split by shifts.

By static count on sm_90 (Triton 3.9's ptxas, 16 rows x 4 groups a step) the loop spends 5.9
SASS instructions a weight, against the generic kernel's 9.0; what is left beyond the three is
each group's sum across threads, x's conversion and the scales' loads. On an H100 a 7B layer's
four projections took 81.7 µs against the generic kernel's 102.4 (gate_up at 56% of copy;
``benchmarks/results/gpu-checks-H100-2026-12-07-f``).

Each program takes ``BLOCK_N`` rows and walks K ``BLOCK_G`` groups at a time; the tiles are 3-D
(row, group, byte), so a group's sum is a reduction over the last axis. Under the Triton
interpreter (no PTX) the codes come from shifts and masks; the rest is the same code.
One launch, no workspace, no host sync; on Hopper a programmatic dependent (``ops/pdl.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from hotmerge_kernels.backend import INTERPRETING
from hotmerge_kernels.ops import pdl

# Per 4 bytes (pack=4): $0,$1 the high nibbles (float16 pairs), $2,$3 the low ones, $4 the bytes.
_NIBBLES_PTX = tl.constexpr("""
{
.reg .b32 t01, t23, m64, m1024, mhi, mlo;
mov.b32 m64, 0x54005400;
mov.b32 m1024, 0x64006400;
mov.b32 mhi, 0x00F000F0;
mov.b32 mlo, 0x000F000F;
prmt.b32 t01, $4, 0, 0x4140;
prmt.b32 t23, $4, 0, 0x4342;
lop3.b32 $0, t01, mhi, m64, 0xea;
lop3.b32 $1, t23, mhi, m64, 0xea;
lop3.b32 $2, t01, mlo, m1024, 0xea;
lop3.b32 $3, t23, mlo, m1024, 0xea;
sub.f16x2 $0, $0, m64;
sub.f16x2 $1, $1, m64;
sub.f16x2 $2, $2, m1024;
sub.f16x2 $3, $3, m1024;
}
""")


def _configs() -> list[triton.Config]:
    if INTERPRETING:  # one small config: the interpreter runs every candidate
        return [triton.Config({"BLOCK_N": 8, "BLOCK_G": 1}, num_warps=4)]
    tiles = [(4, 8, 4, 3), (8, 4, 4, 3), (8, 8, 4, 3), (16, 4, 4, 3), (8, 8, 8, 3), (8, 1, 4, 3)]
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_G": g}, num_warps=w, num_stages=s)
        for n, g, w, s in tiles
    ]


@triton.jit
def _nibbles(b, INTERPRET: tl.constexpr):
    """Bytes (uint8) -> (high code, low code) as exact float16 values 0..15."""
    if INTERPRET:
        b = b.to(tl.int32)
        return (b >> 4).to(tl.float16), (b & 0xF).to(tl.float16)
    return tl.inline_asm_elementwise(
        _NIBBLES_PTX,
        "=r,=r,=r,=r,r",
        [b],
        dtype=(tl.float16, tl.float16),
        is_pure=True,
        pack=4,
    )


@triton.jit
def _x_pairs(x_ptr, pairs):
    """x's columns 2p and 2p + 1 for each p in ``pairs``, as float32. bf16: one 32-bit load a
    pair (contiguous along ``pairs``, so the load needs no layout of its own), split by shifts,
    exactly; other dtypes: two strided loads."""
    if x_ptr.dtype.element_ty == tl.bfloat16:
        word = tl.load(x_ptr.to(tl.pointer_type(tl.uint32)) + pairs)
        return (word << 16).to(tl.float32, bitcast=True), (word & 0xFFFF0000).to(
            tl.float32, bitcast=True
        )
    return tl.load(x_ptr + 2 * pairs).to(tl.float32), tl.load(x_ptr + 2 * pairs + 1).to(tl.float32)


def _whole_steps(configs, named_args, **kwargs):
    """Configs whose step of BLOCK_G groups divides the row's groups (no mask on groups)."""
    groups = named_args["K"] // kwargs["GROUP"]
    return [c for c in configs if groups % c.kwargs["BLOCK_G"] == 0]


@triton.autotune(
    configs=_configs(),
    key=["N", "K", "GROUP"],
    prune_configs_by={"early_config_prune": _whole_steps},
)
@triton.jit
def int4_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    y_ptr,
    N,
    K,
    GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INTERPRET: tl.constexpr,
    PDL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Grid (N tiles,). ``w`` (N, K // 2) bytes, the even column in the high nibble; ``s``
    float32 and ``z`` uint8 (N, K // GROUP); K a multiple of GROUP."""
    pdl.enter(PDL)  # x is the kernel before's output
    HALF: tl.constexpr = GROUP // 2
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    groups = K // GROUP
    rows = w_ptr + offs_n[:, None, None].to(tl.int64) * (K // 2)
    j = tl.arange(0, BLOCK_G)[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (G, HALF) bytes
    sz = offs_n[:, None].to(tl.int64) * groups + tl.arange(0, BLOCK_G)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
    for g in range(0, groups, BLOCK_G):  # BLOCK_G groups a step (groups % BLOCK_G == 0)
        b = tl.load(rows + g * HALF + j[None, :, :], mask=mask_n[:, None, None], other=0)
        hi, lo = _nibbles(b, INTERPRET)
        x_hi, x_lo = _x_pairs(x_ptr, g * HALF + j)
        dot = tl.sum(hi.to(tl.float32) * x_hi[None] + lo.to(tl.float32) * x_lo[None], axis=2)
        x_sum = tl.sum(x_hi + x_lo, axis=1)
        scale = tl.load(s_ptr + sz + g, mask=mask_n[:, None], other=0.0)
        zero = tl.load(z_ptr + sz + g, mask=mask_n[:, None], other=0).to(tl.float32)
        acc += scale * (dot - zero * x_sum[None, :])
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)


__all__ = ["int4_gemv_kernel"]
