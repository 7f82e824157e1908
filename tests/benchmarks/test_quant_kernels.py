"""The benchmark's tinygemm comparison feeds torch's int4 matmul the same codes as the twin: its
packed layout and bf16 (scale, zero) per group from ours, checked on the CPU through torch's CPU
variant of the same scheme."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hotmerge_kernels.quant import quantize
from hotmerge_kernels.quant.formats import unpack_nibbles

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from quant_kernels import relative_error, tinygemm_int4  # noqa: E402


def test_tinygemm_int4_gives_the_twins_product_within_bf16():
    gen = torch.Generator().manual_seed(3)
    # Rows shifted off zero, so the groups' zero codes spread far from tinygemm's fixed 8.
    shift = torch.rand(256, 1, generator=gen) * 0.04
    w = (torch.randn(256, 512, generator=gen) * 0.02 + shift).to(torch.bfloat16)
    qw = quantize(w, "int4")
    assert qw.zero.min() < 4 and len(qw.zero.unique()) > 4
    assert len(unpack_nibbles(qw.packed).unique()) == 16
    for inner_k_tiles in (2, 8):
        call, moved = tinygemm_int4(qw, inner_k_tiles)
        assert relative_error(call, qw) < 1e-2  # bf16 scale, zero and products
        assert moved >= qw.packed.numel()
