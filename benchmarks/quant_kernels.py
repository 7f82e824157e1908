"""The quantized linear kernels alone, at a model's projection shapes, against bf16 ``F.linear``.

Per (format, projection, rows): µs per call (``lora_kernels.bench``: captured calls, L2 flushed
before each), the bytes the call must move (packed weight + scales, x, y) and that as a fraction
of the device's copy bandwidth. ``decode_step.py --quantize`` calls ``quant_kernel_rows``;
alone (needs a GPU):

    python benchmarks/quant_kernels.py --formats fp8,int8,nf4,int4,fp8:scaled_mm
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from hotmerge_kernels import backend
from hotmerge_kernels.quant import quantize
from hotmerge_kernels.quant.linear import qlinear
from lora_kernels import bench

ROWS = (1, 32, 64)


def projections(cfg: dict) -> dict[str, tuple[int, int]]:
    """(out N, in K) of the fused projections of a Llama/Mistral config."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = h // cfg["num_attention_heads"]
    qkv = h + 2 * cfg["num_key_value_heads"] * head_dim
    return {"qkv": (qkv, h), "o": (h, h), "gate_up": (2 * inter, h), "down": (h, inter)}


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
