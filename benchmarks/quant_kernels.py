"""The quantized linear kernels alone, at a model's projection shapes, against bf16 ``F.linear``.

Per (format, projection, rows): µs per call (``lora_kernels.bench``: captured calls, L2 flushed
before each), the bytes the call must move (packed weight + scales, x, y) and that as a fraction
of the device's copy bandwidth. ``decode_step.py --quantize`` calls ``quant_kernel_rows``;
alone (needs a GPU):

    python benchmarks/quant_kernels.py --formats fp8,int8,nf4,int4,fp8:scaled_mm,int4:tinygemm

``int4:tinygemm`` is torch's built-in int4 matmul (``aten._weight_int4pack_mm``, the kernel
torchao's int4 weight-only config runs on CUDA) over the same codes, for comparison; serving
does not use it. Its scale and zero point are bf16 per group (``w = (q - 8)·s + z``), so it is
not the twin's numerics: the rows give its error against the twin.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from hotmerge_kernels import backend
from hotmerge_kernels.quant import Int4Weight, quantize, reference
from hotmerge_kernels.quant.formats import unpack_nibbles
from hotmerge_kernels.quant.linear import qlinear
from lora_kernels import bench

ROWS = (1, 32, 64)


def projections(cfg: dict) -> dict[str, tuple[int, int]]:
    """(out N, in K) of the fused projections of a Llama/Mistral config."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = h // cfg["num_attention_heads"]
    qkv = h + 2 * cfg["num_key_value_heads"] * head_dim
    return {"qkv": (qkv, h), "o": (h, h), "gate_up": (2 * inter, h), "down": (h, inter)}


def tinygemm_int4(qw: Int4Weight, inner_k_tiles: int = 8) -> tuple[Callable, int]:
    """(x -> y through torch's tinygemm int4 matmul, the bytes it reads) for ``qw``'s codes:
    its packed layout from ours (even column in the high nibble, as it expects on CUDA), and
    per group ``(scale, zero)`` in bf16 with ``zero = scale · (8 - zero code)``. On the CPU,
    torch's CPU variant of the same scheme (it packs from unpacked codes), for the test."""
    aten = torch.ops.aten
    if qw.packed.is_cuda:
        pack, matmul = aten._convert_weight_to_int4pack, aten._weight_int4pack_mm
        packed = pack(qw.packed.contiguous(), inner_k_tiles)
    else:
        pack, matmul = aten._convert_weight_to_int4pack_for_cpu, aten._weight_int4pack_mm_for_cpu
        packed = pack(unpack_nibbles(qw.packed).view(qw.shape).to(torch.int32), inner_k_tiles)
    scale = qw.scale.float()
    zero = scale * (8 - qw.zero.float())
    scale_zero = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    moved = packed.numel() * packed.element_size() + scale_zero.numel() * 2

    def call(x: torch.Tensor) -> torch.Tensor:
        return matmul(x, packed, qw.group, scale_zero)

    return call, moved


def relative_error(call: Callable, qw: Int4Weight) -> float:
    """``call``'s largest error against the twin on fresh bf16 rows, over the twin's largest
    output."""
    x = torch.randn(8, qw.shape[1], device=qw.packed.device).to(torch.bfloat16)
    ref = F.linear(x.float(), reference.dequantize(qw, torch.float32))
    return ((call(x).float() - ref).abs().max() / ref.abs().max()).item()


def quant_kernel_rows(formats: list[str], cfg: dict, bandwidth: float) -> list[dict]:
    rows = []
    print("\nkernel              proj      rows     us   x bf16  % of copy")
    for name, (n, k) in projections(cfg).items():
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        for m in ROWS:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            io = (m * k + m * n) * 2
            bf16_us = bench(lambda: F.linear(x, w))  # noqa: B023
            cases = [("bf16", bf16_us, w.numel() * 2 + io)]
            for label in formats:
                fmt, _, matmul = label.partition(":")
                qw = quantize(w, fmt)
                if matmul == "tinygemm":
                    call, moved = tinygemm_int4(qw)
                    if m == ROWS[0]:
                        err = relative_error(call, qw)
                        print(f"int4:tinygemm {name}: error {err:.1e} of the twin's largest output")
                    us = bench(lambda: call(x))  # noqa: B023
                    cases.append((label, us, moved + io))
                    continue
                backend.FP8_MATMUL = matmul or "weight_only"
                us = bench(lambda: qlinear(x, qw))  # noqa: B023
                backend.FP8_MATMUL = "weight_only"
                cases.append((label, us, qw.nbytes + io))
            for label, us, moved in cases:
                of_copy = moved / (us / 1e6) / bandwidth
                rows.append(dict(path="kernel", kernel=label, proj=name, n=n, k=k, rows=m,
                                 us=us, bytes=moved, over_bf16=us / bf16_us,
                                 of_copy=of_copy))  # fmt: skip
                print(f"{label:18s}  {name:8s} {m:5d} {us:7.1f} {us / bf16_us:7.2f} "
                      f"{100 * of_copy:9.0f}%")  # fmt: skip
    return rows


def main() -> None:
    from decode_step import SHAPES, copy_bandwidth

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--formats", default="fp8,int8,nf4,int4,fp8:scaled_mm")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    args = parser.parse_args()
    bandwidth = copy_bandwidth(torch.device("cuda"))
    quant_kernel_rows(args.formats.split(","), SHAPES[args.shape], bandwidth)


if __name__ == "__main__":
    main()
