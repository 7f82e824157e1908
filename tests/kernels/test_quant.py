"""Quantized base weights (``hotmerge_kernels.quant``): formats, NF4 against bitsandbytes, and the
Triton skinny GEMM against its torch twin (CPU: through the Triton interpreter, small shapes,
fresh random weights)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import triton.language as tl
from hotmerge_kernels.quant import FORMATS
from hotmerge_kernels.quant import formats as fmt
from hotmerge_kernels.quant.formats import NF4_CODE, quantize, quantize_nf4
from hotmerge_kernels.quant.linear import dequantize as dequantize_triton
from hotmerge_kernels.quant.linear import qlinear, qlinear_skinny
from hotmerge_kernels.quant.reference import dequantize
from hotmerge_kernels.quant.reference import qlinear as qlinear_torch
from triton.runtime import interpreter

from tests.kernels.random_adapters import needs_triton

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def weight(n: int, k: int, seed: int, dtype=torch.float32, scale: float = 0.05) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * scale
    w[:, :3] *= 8  # a few outliers per row, as real weights have
    return w.to(dtype)


# Relative RMS error of the round trip on these weights (Gaussian, outliers in 3 columns), per
# format: measured nf4 0.116, int4 0.159 (the outliers widen their groups), int8 0.023, fp8
# 0.024; the bounds leave a margin and sit far below a broken format's ~1.
RMS_BOUND = {"nf4": 0.14, "int4": 0.19, "int8": 0.03, "fp8": 0.03}


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_round_trip_within_the_formats_error(name, dtype):
    w = weight(96, 512, seed=3, dtype=dtype)
    qw = quantize(w, name)
    back = dequantize(qw)
    assert back.shape == w.shape and back.dtype == dtype
    err = (back.float() - w.float()).pow(2).mean().sqrt() / w.float().pow(2).mean().sqrt()
    assert 0 < err < RMS_BOUND[name], err
    assert qw.nbytes < w.numel() * 2  # smaller than 16-bit


def test_round_trip_per_element_bounds():
    """Each element within half a step of its group's grid (int8/int4), the exact code for
    values on the grid (nf4), a relative 2**-4 (fp8 e4m3: 3 mantissa bits)."""
    w = weight(64, 256, seed=4)
    q8 = quantize(w, "int8")
    assert ((dequantize(q8) - w).abs() <= q8.scale[:, None] / 2 + 1e-7).all()
    q4 = quantize(w, "int4")
    step = q4.scale.repeat_interleave(128, dim=1)
    assert ((dequantize(q4) - w).abs() <= step / 2 + 1e-6).all()
    qf = quantize(w, "fp8")
    normal = w.abs() > qf.scale[:, None] * 2**-6  # above e4m3's subnormals
    rel = ((dequantize(qf) - w).abs() / w.abs())[normal]
    assert rel.max() <= 2**-4 + 1e-6
    # NF4: values that are code * absmax come back exactly.
    absmax = torch.rand(32, 1) + 0.5
    codes = torch.randint(0, 16, (32, 64))
    on_grid = torch.tensor(NF4_CODE)[codes] * absmax
    on_grid[:, 0] = absmax[:, 0]  # each block holds its absmax
    assert torch.equal(dequantize(quantize_nf4(on_grid)), on_grid)


def test_nf4_packing_order_and_layout():
    """Two codes per byte, the even element in the high nibble (bitsandbytes' order)."""
    w = torch.tensor([[-1.0, 1.0] + [0.0] * 62])
    q = quantize_nf4(w)
    assert q.packed.shape == (1, 32) and q.packed[0, 0].item() == 0x0F
    assert q.packed[0, 1].item() == 0x77  # 0.0 is code 7
    assert torch.equal(q.absmax, torch.tensor([1.0]))


def nf4_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' documented NF4 written out plainly: per 64-block absmax, x * (1/absmax),
    then its decision tree: the code above each float32 midpoint ``x`` exceeds (a value on a
    midpoint takes the lower code), even element high."""
    flat = w.reshape(-1, 64).float()
    absmax = flat.abs().amax(1)
    scaled = (flat * (1 / absmax)[:, None]).clamp(-1, 1)
    code = torch.tensor(NF4_CODE)
    mids = (code[:-1] + code[1:]) / 2
    idx = (scaled[..., None] > mids).sum(-1).to(torch.uint8).reshape(-1)
    return ((idx[0::2] << 4) | idx[1::2]), absmax


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(64, 128), (96, 320), (256, 512)])
def test_nf4_equals_bitsandbytes(dtype, shape):
    """Bit for bit: packed codes and absmax equal bitsandbytes' ``quantize_4bit`` (its CPU
    build when installed; else the documented scheme written out above), and so does the
    dequantized weight."""
    w = weight(*shape, seed=shape[1], dtype=dtype)
    ours = quantize_nf4(w)
    if HAS_BNB:
        import bitsandbytes.functional as bnb

        packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
        assert torch.equal(bnb.dequantize_4bit(packed, state), dequantize(ours))
        absmax = state.absmax
    else:
        packed, absmax = nf4_reference(w)
    assert torch.equal(ours.packed.reshape(-1), packed.reshape(-1))
    assert torch.equal(ours.absmax, absmax)


def test_nf4_reference_equals_ours_on_ties():
    """Values exactly on the midpoints between codes take the lower code, as in bitsandbytes."""
    code = torch.tensor(NF4_CODE)
    mids = (code[:-1] + code[1:]) / 2
    w = torch.cat([mids, torch.ones(1), -mids.flip(0)]).repeat(3)[:64][None, :]
    w[0, 0] = 1.0  # absmax 1: the scaled values are the midpoints themselves
    ours = quantize_nf4(w)
    packed, absmax = nf4_reference(w)
    assert torch.equal(ours.packed.reshape(-1), packed) and torch.equal(ours.absmax, absmax)
    if HAS_BNB:
        import bitsandbytes.functional as bnb

        assert torch.equal(
            bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")[0].reshape(-1), packed
        )


def test_dynamic_code_equals_bitsandbytes():
    code = fmt.dynamic_code("cpu")
    assert code.shape == (256,) and (code.diff() > 0).all() and code[-1] == 1.0
    if HAS_BNB:
        import bitsandbytes.functional as bnb

        assert torch.equal(bnb.create_dynamic_map(signed=True), code)


@pytest.mark.parametrize("shape", [(128, 128), (512, 1024)])
def test_nf4_double_quant_equals_bitsandbytes(shape):
    """Double quantization: absmax2 and offset bit for bit; the 8-bit codes of the absmax are
    the nearest dynamic-code values. bitsandbytes' CPU build finds them by an approximate
    binary search (BinSearch), which may take a code a little farther: allowed only by its
    resolution, and in under 1% of the blocks."""
    w = weight(*shape, seed=7)
    ours = quantize_nf4(w, double_quant=True)
    assert ours.absmax is None and ours.qabsmax.dtype == torch.uint8
    plain = quantize_nf4(w)
    # The decoded scales are near the exact absmax (the centred absmax in an 8-bit dynamic
    # code: measured up to 5.6% here, 1% on average).
    rel = (ours.block_scales() - plain.absmax).abs() / plain.absmax
    assert rel.max() < 0.08 and rel.mean() < 0.02
    assert torch.equal(ours.packed, plain.packed)  # the 4-bit codes do not change
    code = fmt.dynamic_code("cpu")
    offset = plain.absmax.mean()
    centred = (plain.absmax - offset).view(-1, 256)  # shapes here: whole blocks of 256
    absmax2 = centred.abs().amax(1)
    scaled = (centred * (1 / absmax2)[:, None]).reshape(-1)
    if not HAS_BNB:  # the documented scheme written out: nearest code by distance
        assert torch.equal(ours.offset, offset) and torch.equal(ours.absmax2, absmax2)
        nearest = (scaled[:, None] - code).abs().argmin(-1).to(torch.uint8)
        assert torch.equal(ours.qabsmax, nearest)
        return
    import bitsandbytes.functional as bnb

    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed.reshape(-1), ours.packed.reshape(-1))
    assert torch.equal(state.offset, ours.offset)
    assert torch.equal(state.state2.absmax, ours.absmax2)
    assert (state.absmax != ours.qabsmax).float().mean() < 0.01
    # Where they differ, bitsandbytes' code is farther from the value, by its search's
    # resolution at most (measured up to 3.0e-5 on [-1, 1]; ties: float32 rounding).
    extra = (code[state.absmax.long()] - scaled).abs() - (code[ours.qabsmax.long()] - scaled).abs()
    assert extra.min() > -1e-7 and extra.max() < 5e-5


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize(weight(8, 96, seed=1), "int4")  # neither 128 nor 64 divides K
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize(weight(8, 96 + 8, seed=1), "nf4")
    with pytest.raises(ValueError, match="unknown format"):
        quantize(weight(8, 64, seed=1), "int3")


# -- the Triton kernel against its twin -------------------------------------------------------


@pytest.fixture
def bf16_rounds_to_nearest(monkeypatch):
    """The interpreter truncates float32 to bf16; the device rounds to nearest even."""
    truncating = interpreter._convert_float

    def convert(data, src, dst, rounding_mode):
        if src == tl.float32 and dst == tl.bfloat16:
            f32 = torch.from_numpy(np.array(data, dtype=np.float32))
            return f32.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return truncating(data, src, dst, rounding_mode)

    monkeypatch.setattr(interpreter, "_convert_float", convert)


def quantized(name: str, w: torch.Tensor):
    if name == "nf4-dq":
        return quantize_nf4(w, double_quant=True)
    if name == "int4-g64":
        qw = quantize(w, "int4")
        assert qw.group == 64  # K = 576, SmolLM2's width: not a multiple of 128
        return qw
    return quantize(w, name)


# K per variant: int4 whole groups of 128; int4-g64 576 (groups of 64); the rest a partial tile
K_OF = {"int4": 384, "int4-g64": 576}
VARIANTS = [*FORMATS, "nf4-dq", "int4-g64"]


@needs_triton
@pytest.mark.usefixtures("bf16_rounds_to_nearest")
@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_qlinear_equals_twin(name, rows, dtype):
    """Odd N (a partial tile), K with a partial K tile (int4: whole groups), bias."""
    gen = torch.Generator().manual_seed(rows)
    n, k = 40, K_OF.get(name, 320)
    qw = quantized(name, weight(n, k, seed=11, dtype=dtype))
    x = torch.randn(rows, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    got = qlinear_skinny(x, qw, bias)
    want = qlinear_torch(x, qw, bias)
    assert got.shape == want.shape == (rows, n) and got.dtype == dtype
    assert torch.isfinite(got).all()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # the same bf16 weights; float32 sums in another order, one output rounding
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=2e-2)


def test_int4_gemv_steps_only_through_whole_groups():
    """The one-row int4 kernel walks K BLOCK_G groups a step, unmasked: only configs whose step
    divides the row's groups are tried (SmolLM2's 576 columns: 9 groups of 64)."""
    import triton
    from hotmerge_kernels.quant.triton_int4_gemv import _whole_steps

    configs = [triton.Config({"BLOCK_N": 8, "BLOCK_G": g}) for g in (1, 2, 4, 8)]
    fits = _whole_steps(configs, {"K": 576}, GROUP=64)
    assert [c.kwargs["BLOCK_G"] for c in fits] == [1]
    fits = _whole_steps(configs, {"K": 4096}, GROUP=128)
    assert [c.kwargs["BLOCK_G"] for c in fits] == [1, 2, 4, 8]


@needs_triton
@pytest.mark.usefixtures("bf16_rounds_to_nearest")
def test_int4_one_row_of_a_view_at_an_odd_offset():
    """The int4 GEMV reads x a 32-bit word (two bf16 columns) at a time: an x that starts
    2 bytes into a word is copied first, and gives what an aligned x gives."""
    qw = quantize(weight(24, 256, seed=5, dtype=torch.bfloat16), "int4")
    base = torch.randn(257, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    x = base[1:].view(1, 256)
    assert x.data_ptr() % 4 == 2
    got = qlinear_skinny(x, qw)
    assert torch.equal(got, qlinear_skinny(x.clone(), qw))
    torch.testing.assert_close(got.float(), qlinear_torch(x, qw).float(), rtol=2**-7, atol=2e-2)


@needs_triton
def test_qlinear_dispatch_and_3d_input():
    """(B, T, K) inputs keep their leading shape; past SKINNY_ROWS rows, the dequantize kernel."""
    qw = quantize(weight(24, 128, seed=2), "int8")
    x = torch.randn(2, 3, 128)
    twin = qlinear_torch(x, qw)
    assert twin.shape == (2, 3, 24)
    torch.testing.assert_close(qlinear_skinny(x, qw), twin, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="features"):
        qlinear_skinny(torch.randn(1, 64), qw)
    # more than SKINNY_ROWS rows: the dequantize kernel, then one matmul
    many = torch.randn(70, 128)
    torch.testing.assert_close(qlinear(many, qw), qlinear_torch(many, qw), rtol=0, atol=0)


@needs_triton
@pytest.mark.usefixtures("bf16_rounds_to_nearest")
@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_dequantize_equals_twin(name, dtype):
    """The prefill path's dequantize kernel: bit for bit the twin (same float32 math, one
    rounding); partial tiles in N and K."""
    qw = quantized(name, weight(40, K_OF.get(name, 320), seed=13, dtype=dtype))
    assert torch.equal(dequantize_triton(qw, dtype), dequantize(qw, dtype))


def _compile_for_hopper(kernel, signature: dict, constexprs: dict, **options):
    """Compile a Triton kernel for sm_90 (no GPU needed: the bundled ptxas); returns it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    consts = {(kernel.arg_names.index(k),): v for k, v in constexprs.items()}
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def compile_all_for_hopper() -> None:
    """Every format's kernels compiled for sm_90: one row and 64 rows, the first and the last
    tile of each row count's set (run outside the interpreter: see the test below)."""
    from hotmerge_kernels.quant import triton_qlinear as tq

    configs = tq._configs()
    formats = [(tq.NF4, False, "*u8"), (tq.NF4, True, "*u8"), (tq.INT4, False, "*u8"),
               (tq.INT8, False, "*i8"), (tq.FP8, False, "*fp8e4nv")]  # fmt: skip
    for fmt_id, double, w_type in formats:
        ptrs = dict(w_ptr=w_type, s_ptr="*fp32", z_ptr="*u8", code_ptr="*fp32", q2_ptr="*u8",
                    s2_ptr="*fp32", offset_ptr="*fp32")  # fmt: skip
        flags = dict(
            FMT=fmt_id, DOUBLE=double, GROUP=128 if fmt_id == tq.INT4 else 64, INTERPRET=False
        )
        signature = dict(x_ptr="*bf16", **ptrs, bias_ptr="*bf16", y_ptr="*bf16", M="i32",
                         N="i32", K="i32", stride_xm="i32", stride_ym="i32")  # fmt: skip
        for block_m in (1, 64):
            fitting = [c for c in configs if c.kwargs["GEMV"] == (block_m == 1)]
            for config in (fitting[0], fitting[-1]):
                pdl = block_m == 1  # as ``qlinear_skinny`` launches them
                consts = dict(flags, HAS_BIAS=True, PDL=pdl, BLOCK_M=block_m, **config.kwargs)
                options = dict(num_warps=config.num_warps, num_stages=config.num_stages,
                               launch_pdl=pdl)  # fmt: skip
                compiled = _compile_for_hopper(tq.qlinear_kernel.fn, signature, consts, **options)
                assert compiled.metadata.shared <= 227 * 1024
        sig = dict(**ptrs, out_ptr="*bf16", N="i32", K="i32")
        consts = dict(flags, BLOCK_N=32, BLOCK_K=128)
        _compile_for_hopper(tq.dequantize_kernel, sig, consts, num_warps=4)
    from hotmerge_kernels.quant import triton_int4_gemv as g

    signature = dict(x_ptr="*bf16", w_ptr="*u8", s_ptr="*fp32", z_ptr="*u8", bias_ptr="*bf16",
                     y_ptr="*bf16", N="i32", K="i32")  # fmt: skip
    for config in g._configs():  # every one: its inline PTX must assemble
        consts = dict(GROUP=128, HAS_BIAS=True, INTERPRET=False, PDL=True, **config.kwargs)
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=True)
        _compile_for_hopper(g.int4_gemv_kernel.fn, signature, consts, **options)


def test_kernels_compile_for_hopper():
    """What the interpreter cannot check: the kernels lower to sm_90 code for every format
    (else the first GPU run would be the first compile; every tile config of every format was
    compiled once by hand with the GPU machine's Triton 3.6, 2026-12-07: none failed, one spills
    24 bytes). A child process, since the interpreter replaces ``triton.jit``."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    code = "from tests.kernels.test_quant import compile_all_for_hopper as c; c()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@needs_triton
def test_fp8_scaled_mm_switch_is_read_from_the_backend(monkeypatch):
    """``backend.FP8_MATMUL`` (``HOTMERGE_FP8_MATMUL``) sends fp8 weights, and only them, to
    ``_scaled_mm``; a value it does not know stops the import with the choices."""
    import os
    import subprocess
    import sys

    from hotmerge_kernels import backend
    from hotmerge_kernels.quant import linear

    calls = []
    monkeypatch.setattr(linear, "fp8_scaled_mm", lambda x, qw, bias: calls.append(qw) or x)
    monkeypatch.setattr(backend, "FP8_MATMUL", "scaled_mm")
    w = weight(8, 128, seed=5)
    x = torch.randn(3, 128)
    qlinear(x, quantize(w, "fp8"))
    qlinear(x, quantize(w, "int8"))
    assert [qw.format for qw in calls] == ["fp8"]

    env = {**os.environ, "HOTMERGE_FP8_MATMUL": "w8a8"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    code = "import hotmerge_kernels.backend"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "HOTMERGE_FP8_MATMUL must be one of" in done.stderr
