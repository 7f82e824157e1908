"""The quantized linear kernels on the device at 7B sizes (``pytest -m gpu``): the Triton skinny
GEMM and fp8 ``_scaled_mm`` against the torch twin, inside a CUDA graph, and quantization on the
device equal to the CPU's (NF4: bitsandbytes' codes, bit for bit)."""

from __future__ import annotations

import pytest
import torch
from hotmerge_kernels.quant import FORMATS, quantize
from hotmerge_kernels.quant.formats import quantize_nf4
from hotmerge_kernels.quant.linear import fp8_scaled_mm, qlinear, qlinear_skinny
from hotmerge_kernels.quant.reference import qlinear as qlinear_torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# (out N, in K): o_proj, gate/up, down of a 7B Llama.
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]


def weight(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(n, k, generator=gen, device="cuda") * 0.02).to(torch.bfloat16)


def quantized(name: str, w: torch.Tensor):
    return quantize_nf4(w, double_quant=True) if name == "nf4-dq" else quantize(w, name)


def assert_near_twin(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    """bf16 outputs: float32 sums in another order, one rounding each; judged per row norm."""
    assert torch.isfinite(got).all()
    err = (got.float() - want.float()).norm(dim=-1) / want.float().norm(dim=-1)
    assert err.max() < rel, err.max()


@pytest.mark.parametrize("name", [*FORMATS, "nf4-dq"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rows", [1, 7, 32, 64, 200])
def test_qlinear_equals_twin_at_7b_sizes(name, shape, rows):
    n, k = shape
    qw = quantized(name, weight(n, k, seed=n + k))
    x = torch.randn(rows, k, device="cuda").to(torch.bfloat16)
    bias = torch.randn(n, device="cuda").to(torch.bfloat16)
    want = qlinear_torch(x, qw, bias)
    got = qlinear(x, qw, bias)  # the Triton kernel up to 64 rows, dequantize + cuBLAS above
    assert_near_twin(got, want, rel=5e-3)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rows", [1, 32, 256])
def test_fp8_scaled_mm_near_twin(shape, rows):
    """W8A8 (activations rounded to e4m3 per row): within e4m3's relative step of the twin."""
    n, k = shape
    qw = quantize(weight(n, k, seed=3), "fp8")
    x = torch.randn(rows, k, device="cuda").to(torch.bfloat16)
    assert_near_twin(fp8_scaled_mm(x, qw), qlinear_torch(x, qw), rel=6e-2)


@pytest.mark.parametrize("name", FORMATS)
def test_qlinear_in_a_cuda_graph_equals_eager(name):
    qw = quantize(weight(4096, 4096, seed=5), name)
    x = torch.randn(8, 4096, device="cuda").to(torch.bfloat16)
    eager = qlinear_skinny(x, qw)  # also autotunes, outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = qlinear_skinny(x, qw)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, qlinear_skinny(x, qw), rtol=0, atol=0)
    assert not torch.equal(out, eager)


@pytest.mark.parametrize("name", FORMATS)  # not nf4-dq: its offset is a mean (summation order)
def test_quantize_on_the_device_equals_the_cpu(name):
    w = weight(512, 1024, seed=9)
    dev, cpu = quantized(name, w), quantized(name, w.cpu())
    for a, b in zip(dev.tensors(), cpu.tensors(), strict=True):
        assert torch.equal(bits(a.cpu()), bits(b))


def bits(t: torch.Tensor) -> torch.Tensor:
    """fp8 as its bytes (torch.equal has no fp8 kernel)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
