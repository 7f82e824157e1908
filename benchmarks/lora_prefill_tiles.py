"""Tile sweep of the multi-LoRA prefill kernels (the slot-grouped tile list): which tokens per tile
(``PREFILL_BLOCK_M``), expand n tile and shrink k step to fix in ``lora``.

At Mistral-7B group shapes, for mixed steps (32 decode rows over 8 adapters, then a 128-token
prompt: 160 tokens; 31 rows of distinct adapters, then a prompt: 159 tokens) and a prefill of
eight 128-token prompts (1024 tokens), each variant (tokens per tile, expand n tile, shrink k
step, a column's programs beyond one group's tiles) is
checked against the torch twin, then shrink and expand are timed as ``lora_kernels.bench`` times
them (in a CUDA graph, after an L2 flush). Prints one line per variant and writes JSON. The
module's tiles are replaced while it runs.

    PYTHONPATH=kernels:benchmarks python benchmarks/lora_prefill_tiles.py --out /tmp/t.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from hotmerge_kernels.ops import lora, reference
from lora_kernels import GROUPS, bench, copy_bandwidth, token_slots

CASES = [("gate_up", 160, "mixed-8"), ("qkv", 160, "mixed-8"), ("down", 160, "mixed-8"),
         ("gate_up", 159, "mixed-31"), ("down", 159, "mixed-31"),
         ("gate_up", 1024, "prompts-8"), ("down", 1024, "prompts-8")]  # fmt: skip
# (tokens per tile, expand BLOCK_N, shrink BLOCK_K, extra programs); the first: before the sweep
VARIANTS = [(64, 128, 128, 8)] + [
    (m, n, 128, extra) for m in (16, 32) for n in (128, 256) for extra in (8, 64)
]


def run(group: str, t: int, mix: str, variant, slots: int = 64) -> dict:
    block_m, block_n, block_k, extra = variant
    lora.PREFILL_BLOCK_M, lora.EXTRA_TILE_PROGRAMS = block_m, extra
    lora._expand_tiles = lambda _t: dict(BLOCK_N=block_n, BLOCK_K=16, num_warps=4, num_stages=3)
    lora._shrink_tiles = lambda _t: dict(BLOCK_R=16, BLOCK_K=block_k, num_warps=4, num_stages=3)
    n_in, widths = GROUPS[group]
    ns, offsets = len(widths), tuple(sum(widths[:i]) for i in range(len(widths) + 1))
    gen = torch.Generator(device="cuda").manual_seed(t)
    a = (torch.randn(slots, ns, 16, n_in, generator=gen, device="cuda") * 0.02).bfloat16()
    b = (torch.randn(slots, 16, offsets[-1], generator=gen, device="cuda") * 0.02).bfloat16()
    ranks = torch.full((slots,), 16, dtype=torch.int32, device="cuda")
    slot_ids = token_slots(t, mix)
    x = torch.randn(t, n_in, generator=gen, device="cuda").bfloat16()
    y0 = torch.randn(t, offsets[-1], generator=gen, device="cuda").bfloat16()
    meta = lora.LoraKernelMeta(t, slots, "cuda")
    meta.update(slot_ids)
    buf = lora.lora_workspace([n_in], ns, t, 16, "cuda")
    got, want = y0.clone(), y0.clone()
    lora.lora_apply(x, got, a, b, ranks, slot_ids, offsets, buf, meta)
    reference.lora_apply(x, want, a, b, ranks, slot_ids, offsets, torch.zeros_like(buf))
    err = float((got.float() - want.float()).abs().max() / want.float().abs().max())
    shrink = bench(lambda: lora.lora_shrink(x, a, ranks, slot_ids, buf, meta))
    expand = bench(lambda: lora.lora_expand(buf, b, ranks, slot_ids, got, offsets, meta))
    row = dict(group=group, tokens=t, mix=mix, block_m=block_m, block_n=block_n,
               block_k=block_k, extra_programs=extra, shrink_us=shrink, expand_us=expand,
               err=err)  # fmt: skip
    print(f"{group:8} {t:5} {mix:9} M{block_m:<3} N{block_n:<4} K{block_k:<4} +{extra:<3} shrink "
          f"{shrink:7.1f} us  expand {expand:7.1f} us  err {err:.1e}", flush=True)  # fmt: skip
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    copy_bw = copy_bandwidth()
    rows = [run(*case, variant) for case in CASES for variant in VARIANTS]
    device = torch.cuda.get_device_name()
    args.out.write_text(json.dumps(dict(device=device, copy_gbps=copy_bw / 1e9, rows=rows)))


if __name__ == "__main__":
    main()
