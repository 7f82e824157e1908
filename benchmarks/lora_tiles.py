"""Tile sweep of the multi-LoRA decode kernels: which split width and tiles to fix in lora_apply.

At Mistral-7B group shapes and decode mixes (1 row, 32 distinct slots, 32 rows of one slot), times
``lora_shrink`` for several split widths / tiles and ``lora_expand`` for several n tiles
(``lora_kernels.bench``), each checked against the torch twin first; expand also on a pool padded
to max rank 128 (rank 16 used) in the engine's rank-major layout ``(slots, max_rank, out)`` and
out-major ``(slots, out, max_rank)`` (a transposed view: same kernel, other strides; 37 against
19-20 us at gate_up, 32 distinct rows, on the H200). Prints one line per
variant; the tiles and splits used by the engine are lora_apply's ``_shrink_tiles``,
``_expand_tiles`` and ``lora_splits``, which this script replaces while it runs.

    PYTHONPATH=kernels python benchmarks/lora_tiles.py --out /tmp/tiles.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
from hotmerge_kernels.ops import reference
from lora_kernels import GROUPS, bench, bytes_moved, copy_bandwidth, token_slots

MIXES = [(1, "distinct"), (32, "distinct"), (32, "shared")]
SHRINK = [  # (split width, BLOCK_K, num_warps) of the decode (per-row) kernel
    (512, 512, 4),
    (512, 256, 4),
    (512, 512, 8),
    (512, 512, 2),
    (256, 256, 4),
]
EXPAND = [(256, 4), (512, 4), (1024, 4), (1024, 8), (2048, 8)]  # (BLOCK_N, num_warps)


def pool(group, rank, max_rank, slots=64, out_major=False, dtype=torch.bfloat16):
    n_in, widths = GROUPS[group]
    ns, out_total = len(widths), sum(widths)
    a = (torch.randn(slots, ns, max_rank, n_in, device="cuda") * 0.02).to(dtype)
    if out_major:  # B stored (slots, out, max_rank), passed as a transposed view
        b = (torch.randn(slots, out_total, max_rank, device="cuda") * 0.02).to(dtype)
        b = b.transpose(1, 2)
    else:
        b = (torch.randn(slots, max_rank, out_total, device="cuda") * 0.02).to(dtype)
    ranks = torch.full((slots,), rank, dtype=torch.int32, device="cuda")
    offsets = tuple(sum(widths[:i]) for i in range(ns + 1))
    return a, b, ranks, offsets


def run(group, t, mix, lora, copy_bw, shrink_variants, expand_variants, label):
    a, b, ranks, offsets = lora
    n_in, widths = GROUPS[group]
    ns, max_rank = len(widths), a.shape[2]
    slots = token_slots(t, mix)
    x = torch.randn(t, n_in, device="cuda").to(a.dtype)
    y0 = torch.randn(t, offsets[-1], device="cuda").to(a.dtype)
    meta = lora.LoraKernelMeta(t, a.shape[0], "cuda")
    meta.update(slots)
    want_buf = torch.full((1, ns, t, max_rank), float("nan"), device="cuda")
    want = y0.clone()
    reference.lora_shrink(x, a, ranks, slots, want_buf)
    reference.lora_expand(want_buf, b, ranks, slots, want, offsets)
    b_shrink, b_expand = bytes_moved(n_in, widths, int(ranks[0]), slots, a.element_size())
    rows = []
    for kind, variants in (("shrink", shrink_variants), ("expand", expand_variants)):
        for v in variants:
            if kind == "shrink":
                width, block_k, warps = v
                lora._shrink_tiles = lambda _t, bk=block_k, w=warps: dict(
                    BLOCK_R=16, BLOCK_K=bk, num_warps=w, num_stages=1
                )
                splits = triton.cdiv(n_in, width)
            else:
                block_n, warps = v
                lora._expand_tiles = lambda _t, bn=block_n, w=warps: dict(
                    BLOCK_N=bn, BLOCK_K=16, num_warps=w, num_stages=1
                )
                splits = triton.cdiv(n_in, 512)
            buf = torch.full((splits, ns, t, max_rank), float("nan"), device="cuda")
            lora.lora_shrink(x, a, ranks, slots, buf, meta)
            y = y0.clone()
            lora.lora_expand(buf, b, ranks, slots, y, offsets, meta)
            err = float((y.float() - want.float()).abs().max() / want.float().abs().max())
            if kind == "shrink":
                us = bench(lambda: lora.lora_shrink(x, a, ranks, slots, buf, meta))  # noqa: B023
                moved = b_shrink
            else:
                us = bench(lambda: lora.lora_expand(buf, b, ranks, slots, y, offsets, meta))  # noqa: B023
                moved = b_expand
            row = dict(group=group, tokens=t, mix=mix, pool=label, kernel=kind, variant=v,
                       us=us, of_copy=moved / us * 1e6 / copy_bw, err=err)  # fmt: skip
            rows.append(row)
            print(f"{group:8} {t:3} {mix:8} {label:10} {kind} {str(v):16} {us:7.1f} us "
                  f"{100 * row['of_copy']:5.1f}% err {err:.1e}", flush=True)  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    copy_bw = copy_bandwidth()
    print(f"copy {copy_bw / 1e9:.0f} GB/s")
    rows = []
    for group in GROUPS:
        weights = pool(group, 16, 16)
        for t, mix in MIXES:
            rows += run(group, t, mix, weights, copy_bw, SHRINK, EXPAND, "max16")
        del weights
    for out_major in (False, True):  # padded pool: does B's layout matter?
        weights = pool("gate_up", 16, 128, out_major=out_major)
        label = "pad128-om" if out_major else "pad128"
        rows += run("gate_up", 32, "distinct", weights, copy_bw, [], EXPAND[1:3], label)
        del weights
    args.out.write_text(json.dumps(dict(copy_gbps=copy_bw / 1e9, rows=rows), indent=1))


if __name__ == "__main__":
    main()
