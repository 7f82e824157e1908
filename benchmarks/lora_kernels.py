"""Multi-LoRA shrink/expand kernels at Mistral-7B shapes: time, achieved bandwidth, torch twin.

For each projection group (q/k/v fused, o, gate/up fused, down), adapter rank (16, 64) and token
mix (decode batches 1/16/32/64 with all-distinct slots or one shared slot; a 512-token prefill
over 2 slots; prefills of 1024 and 2048 tokens in 128-token prompts over 8 slots; a mixed
step's 32 decode rows and one prompt), the kernels are checked against their torch twins, then
timed as a decode graph runs them (``bench``): calls captured in a CUDA graph, so no host
launch time is counted, each after a read of twice the L2 so that weights come from HBM. The
pool has 64 slots of max rank 128 (a cat-merged adapter's width), each slot using ``rank``:
padding past the rank must cost nothing.

Bytes moved count what the kernels must touch: the A (shrink) or B (expand) rows of the ranks
in use of each distinct slot, once, plus activations (x read, buf written / read, y read and
written) for the tokens with a slot; shrink's partial sums of a split ``in`` (``buf``'s extra
splits, a few KB in L2) are not counted. Bandwidth is reported as GB/s and as a fraction of a 1 GiB
device-to-device copy measured in the same run. ``meta.update`` (once per step, shared by all
layers) is timed apart. Prints a table; writes JSON (device, versions, date, splits and tiles).

    PYTHONPATH=kernels python benchmarks/lora_kernels.py --out benchmarks/results/lora.json
        [--ranks 16 64] [--slots 64] [--max-rank 128]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "kernels"), str(ROOT)]

from hotmerge_kernels.ops import lora, reference  # noqa: E402

HIDDEN, INTERMEDIATE, KV = 4096, 14336, 1024
GROUPS = {  # projection group: (in_features, slice widths)
    "qkv": (HIDDEN, (HIDDEN, KV, KV)),
    "o": (HIDDEN, (HIDDEN,)),
    "gate_up": (HIDDEN, (INTERMEDIATE, INTERMEDIATE)),
    "down": (INTERMEDIATE, (HIDDEN,)),
}
MIXES = [(t, "distinct") for t in (1, 16, 32, 64)] + [(t, "shared") for t in (1, 16, 32, 64)]
# Prefill and mixed steps as serving runs them: 128-token prompts over 8 adapters, and a mixed
# step's 32 decode rows (one token each, 8 adapters) before one prompt of a ninth.
MIXES += [(512, "prefill-2"), (1024, "prompts-8"), (2048, "prompts-8"), (160, "mixed-8")]


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / ms * 1e3


def token_slots(t: int, mix: str) -> torch.Tensor:
    if mix == "distinct":
        slots = torch.arange(t)
    elif mix == "shared":
        slots = torch.zeros(t, dtype=torch.int64)
    elif mix == "prompts-8":  # prompts of 128 tokens, prompt i with adapter i % 8
        slots = (torch.arange(t) // 128) % 8
    elif mix == "mixed-8":  # decode rows of adapters i % 8, then one prompt of adapter 8
        slots = torch.cat([torch.arange(32) % 8, torch.full((t - 32,), 8)])
    elif mix == "mixed-31":  # 31 decode rows of distinct adapters, then a prompt of adapter 0
        slots = torch.cat([torch.arange(1, 32), torch.zeros(t - 31, dtype=torch.int64)])
    else:  # two adapters, their tokens interleaved at random (the kernels group them)
        slots = torch.randint(0, 2, (t,), generator=torch.Generator().manual_seed(0))
    return slots.to(torch.int32).cuda()


def bytes_moved(n_in, widths, rank, slots, elt) -> tuple[int, int]:
    """(shrink, expand) bytes: weights of the distinct slots' ranks + the tokens' activations."""
    ns, out_total = len(widths), sum(widths)
    used = int((slots >= 0).sum())
    distinct = int(torch.unique(slots[slots >= 0]).numel())
    shrink = distinct * ns * rank * n_in * elt + used * n_in * elt + ns * used * rank * 4
    expand = distinct * out_total * rank * elt + ns * used * rank * 4 + 2 * used * out_total * elt
    return shrink, expand


def bench(fn, calls: int = 20, replays: int = 10) -> float:
    """Microseconds per call of ``fn``: ``calls`` calls captured in one CUDA graph, each after a
    read of twice the L2 (clean lines out, as after a GEMM's weight reads); the same graph of
    reads alone is subtracted. Median over ``replays`` replays."""
    flush = torch.empty(2 * torch.cuda.get_device_properties().L2_cache_size // 4, device="cuda")
    flush.normal_()

    def replay_ms(with_fn: bool) -> float:
        fn()  # compile, allocate outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                flush.max()
                if with_fn:
                    fn()
        graph.replay()
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(True), torch.cuda.Event(True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[replays // 2]

    return (replay_ms(True) - replay_ms(False)) / calls * 1e3


def host_timed_us(fn, iters: int = 3) -> float:
    """Median microseconds of ``fn`` with a device sync after each call (for the torch twin)."""
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e6)
    return sorted(times)[iters // 2]


def run_group(group, rank, args, copy_bw, dtype=torch.bfloat16) -> list[dict]:
    n_in, widths = GROUPS[group]
    ns, out_total = len(widths), sum(widths)
    offsets = tuple(sum(widths[:i]) for i in range(ns + 1))
    gen = torch.Generator(device="cuda").manual_seed(rank)
    shape_a = (args.slots, ns, args.max_rank, n_in)
    lora_a = (torch.randn(shape_a, generator=gen, device="cuda") * 0.02).to(dtype)
    shape_b = (args.slots, args.max_rank, out_total)
    lora_b = (torch.randn(shape_b, generator=gen, device="cuda") * 0.02).to(dtype)
    slot_ranks = torch.full((args.slots,), rank, dtype=torch.int32, device="cuda")
    pool = (lora_a, lora_b, slot_ranks, offsets)
    return [measure(group, rank, t, mix, pool, args, copy_bw) for t, mix in MIXES]


def measure(group, rank, t, mix, pool, args, copy_bw) -> dict:
    """Check then time shrink, expand, the torch twin and the meta update for one token mix."""
    lora_a, lora_b, slot_ranks, offsets = pool
    n_in, widths = GROUPS[group]
    ns, out_total, dtype = len(widths), sum(widths), lora_a.dtype
    gen = torch.Generator(device="cuda").manual_seed(t)
    slots = token_slots(t, mix)
    x = torch.randn(t, n_in, generator=gen, device="cuda").to(dtype)
    y = torch.randn(t, out_total, generator=gen, device="cuda").to(dtype)
    buf = lora.lora_workspace([n_in], ns, t, args.max_rank, "cuda").normal_()
    meta = lora.LoraKernelMeta(t, args.slots, "cuda")
    meta.update(slots)

    # Correctness on the real sizes first (this call also compiles both kernels).
    got, want = y.clone(), y.clone()
    lora.lora_apply(x, got, lora_a, lora_b, slot_ranks, slots, offsets, buf, meta)
    want_buf = torch.zeros_like(buf)
    reference.lora_apply(x, want, lora_a, lora_b, slot_ranks, slots, offsets, want_buf)
    err = float((got.float() - want.float()).abs().max() / want.float().abs().max())

    shrink_us = bench(lambda: lora.lora_shrink(x, lora_a, slot_ranks, slots, buf, meta))
    expand_us = bench(lambda: lora.lora_expand(buf, lora_b, slot_ranks, slots, y, offsets, meta))
    torch_us = host_timed_us(
        lambda: reference.lora_apply(x, y, lora_a, lora_b, slot_ranks, slots, offsets, buf)
    )
    meta_us = bench(lambda: meta.update(slots))
    b_shrink, b_expand = bytes_moved(n_in, widths, rank, slots, lora_a.element_size())
    row = {
        "group": group,
        "rank": rank,
        "tokens": t,
        "mix": mix,
        "max_rel_err": err,
        "shrink_us": shrink_us,
        "expand_us": expand_us,
        "shrink_bytes": b_shrink,
        "expand_bytes": b_expand,
        "shrink_gbps": b_shrink / shrink_us / 1e3,
        "expand_gbps": b_expand / expand_us / 1e3,
        "shrink_of_copy": b_shrink / shrink_us * 1e6 / copy_bw,
        "expand_of_copy": b_expand / expand_us * 1e6 / copy_bw,
        "torch_apply_us": torch_us,
        "meta_update_us": meta_us,
        "splits": buf.shape[0],
        "shrink_tiles": str(lora._shrink_tiles(t)),
        "expand_tiles": str(lora._expand_tiles(t)),
    }
    print(
        f"{group:8} r{rank:<3} {t:4} {mix:9} "
        f"shrink {shrink_us:7.1f} us {row['shrink_gbps']:7.0f} GB/s "
        f"{100 * row['shrink_of_copy']:5.1f}% | "
        f"expand {expand_us:7.1f} us {row['expand_gbps']:7.0f} GB/s "
        f"{100 * row['expand_of_copy']:5.1f}% | torch {torch_us:8.1f} us | "
        f"meta {meta_us:5.1f} us | err {err:.1e}",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results path")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--slots", type=int, default=64, help="adapter slots in the pool")
    parser.add_argument("--max-rank", type=int, default=128, help="pool width (padding)")
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    args = parser.parse_args()
    torch.manual_seed(0)
    copy_bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    rows = []
    for rank in args.ranks:
        for group in args.groups:
            rows.extend(run_group(group, rank, args, copy_bw))
            torch.cuda.empty_cache()
    result = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "dtype": "bfloat16",
        "slots": args.slots,
        "max_rank": args.max_rank,
        "copy_gbps": copy_bw / 1e9,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
