"""Paged decode attention at 7B shapes: achieved bandwidth against the device copy bandwidth.

32 query heads, 8 kv heads, head_dim 128, bf16, block size 16, every row at the full context,
physical blocks shuffled over the pool. For each batch and context: a correctness check of the
Triton path against the torch twin, then the time of a CUDA-graph replay of ``PagedAttention``
(L2 flushed between replays by ``do_bench``), the bytes it must move (K and V of every live token,
q and out) and the fraction of the copy bandwidth measured in the same run; the torch twin and
torch SDPA on contiguous K/V are timed beside it. ``--tune`` sweeps the launch shapes instead.
Writes a table to stdout and JSON to --out (default benchmarks/results/paged_attention-<device>-
<date>.json).

    PYTHONPATH=kernels python benchmarks/paged_attention.py [--batches 1 16 32 64]
        [--contexts 512 2048 8192] [--window 0] [--tune]
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "kernels")]

from hotmerge_kernels.ops import paged_attention, reference  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 32, 8, 128, 16, torch.bfloat16
TUNE_SHAPES = [(32, 2048), (1, 8192), (64, 8192), (16, 512)]  # (batch, context)
TUNE_GRID = {
    "partition_size": [256, 512, 1024],
    "tile_size": [32, 64, 128],
    "num_warps": [4, 8],
    "num_stages": [2, 3, 4],
}


def copy_bandwidth() -> float:
    """Bytes per ms of a 1 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / ms


def make_problem(batch: int, context: int, seed: int = 0) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_row = triton.cdiv(context, BLOCK_SIZE)
    num_blocks = batch * blocks_per_row
    shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen)
    v_cache = torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen)
    return {
        "q": torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen),
        "k_cache": k_cache,
        "v_cache": v_cache,
        "block_tables": perm.view(batch, blocks_per_row).int(),
        "seq_lens": torch.full((batch,), context, dtype=torch.int32, device="cuda"),
    }


def bytes_moved(batch: int, context: int, window: int) -> int:
    live = min(context, window) if window else context
    kv = 2 * batch * live * KV_HEADS * HEAD_DIM * DTYPE.itemsize
    return kv + 2 * batch * HEADS * HEAD_DIM * DTYPE.itemsize  # + q and out


def graph_ms(p: dict, window: int, **launch) -> tuple[float, torch.Tensor]:
    """Median ms of one replay of the captured kernel pair, and its output."""
    batch = p["q"].shape[0]
    attn = paged_attention.PagedAttention(
        batch, HEADS, HEAD_DIM, p["block_tables"].shape[1], BLOCK_SIZE, "cuda", **launch
    )
    out = torch.empty_like(p["q"])
    args = (p["q"], p["k_cache"], p["v_cache"], p["block_tables"], p["seq_lens"])
    scale = HEAD_DIM**-0.5
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        attn.forward(*args, scale, window, out)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attn.forward(*args, scale, window, out)
    ms = do_bench(graph.replay, warmup=25, rep=200, return_mode="median")
    return ms, out


def twin_ms(p: dict, window: int) -> tuple[float, torch.Tensor]:
    args = (p["q"], p["k_cache"], p["v_cache"], p["block_tables"], p["seq_lens"])
    out = reference.paged_decode_attention(*args, HEAD_DIM**-0.5, window)
    ms = do_bench(
        lambda: reference.paged_decode_attention(*args, HEAD_DIM**-0.5, window),
        warmup=5, rep=100, return_mode="median",
    )  # fmt: skip
    return ms, out


def sdpa_ms(p: dict, context: int) -> float:
    """torch SDPA on contiguous K/V of the same rows (no window): the unpaged baseline."""
    batch = p["q"].shape[0]
    k = p["k_cache"][p["block_tables"].long()].flatten(1, 2)[:, :context].transpose(1, 2)
    v = p["v_cache"][p["block_tables"].long()].flatten(1, 2)[:, :context].transpose(1, 2)
    k, v = k.contiguous(), v.contiguous()  # (B, kv heads, T, D)
    q = p["q"].view(batch, HEADS, 1, HEAD_DIM)
    fn = torch.nn.functional.scaled_dot_product_attention
    return do_bench(lambda: fn(q, k, v, enable_gqa=True), warmup=10, rep=100, return_mode="median")


def check(got: torch.Tensor, want: torch.Tensor) -> float:
    err = float((got.float() - want.float()).abs().max())
    if not err <= 3e-2:
        raise AssertionError(f"Triton path differs from the twin by {err}")
    return err


def run_sweep(args, bw: float) -> list[dict]:
    rows = []
    print(f"{'batch':>5} {'ctx':>6} {'MB':>8} {'triton us':>10} {'GB/s':>7} {'copy%':>6} "
          f"{'twin us':>9} {'sdpa us':>9} {'max err':>8}")  # fmt: skip
    for batch, context in itertools.product(args.batches, args.contexts):
        p = make_problem(batch, context)
        ms, out = graph_ms(p, args.window)
        tms, want = twin_ms(p, args.window)
        err = check(out, want)
        sms = None if args.window else sdpa_ms(p, context)
        nbytes = bytes_moved(batch, context, args.window)
        row = {
            "batch": batch,
            "context": context,
            "window": args.window,
            "bytes": nbytes,
            "triton_ms": ms,
            "gbps": nbytes / ms / 1e6,
            "copy_fraction": nbytes / ms / bw,
            "twin_ms": tms,
            "sdpa_ms": sms,
            "max_abs_err_vs_twin": err,
        }
        rows.append(row)
        sdpa = f"{sms * 1e3:9.1f}" if sms is not None else f"{'-':>9}"
        print(f"{batch:5d} {context:6d} {nbytes / 1e6:8.1f} {ms * 1e3:10.1f} {row['gbps']:7.0f} "
              f"{100 * row['copy_fraction']:5.1f}% {tms * 1e3:9.1f} {sdpa} {err:8.1e}")  # fmt: skip
        del p
        torch.cuda.empty_cache()
    return rows


def run_tune(args, bw: float) -> list[dict]:
    rows = []
    for batch, context in TUNE_SHAPES:
        p = make_problem(batch, context)
        _, want = twin_ms(p, args.window)
        nbytes = bytes_moved(batch, context, args.window)
        best = None
        for values in itertools.product(*TUNE_GRID.values()):
            launch = dict(zip(TUNE_GRID, values, strict=True))
            if launch["partition_size"] % launch["tile_size"]:
                continue
            try:
                ms, out = graph_ms(p, args.window, **launch)
            except Exception as exc:  # e.g. out of shared memory for deep pipelines
                print(f"  {batch} x {context} {launch}: {type(exc).__name__}")
                continue
            check(out, want)
            row = {"batch": batch, "context": context, **launch, "triton_ms": ms,
                   "copy_fraction": nbytes / ms / bw}  # fmt: skip
            rows.append(row)
            if best is None or ms < best["triton_ms"]:
                best = row
        print(f"batch {batch} ctx {context}: best {best}")
        launch = {k: getattr(paged_attention, k.upper()) for k in TUNE_GRID}
        default = [r for r in rows if r["batch"] == batch and r["context"] == context
                   and all(r[k] == launch[k] for k in TUNE_GRID)]  # fmt: skip
        if default:
            print(f"  default: {default[0]}")
        del p
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 32, 64])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--window", type=int, default=0, help="sliding window (0: none)")
    parser.add_argument("--tune", action="store_true", help="sweep launch shapes instead")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    device = torch.cuda.get_device_name()
    print(f"{device}: copy bandwidth {bw / 1e6:.0f} GB/s (read + write)")
    rows = run_tune(args, bw) if args.tune else run_sweep(args, bw)
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    kind = "tune" if args.tune else "sweep"
    out = args.out or ROOT / "benchmarks" / "results" / (
        f"paged_attention-{kind}-{device.replace(' ', '_')}-{date}.json"
    )
    meta = {
        "device": device,
        "date": date,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "copy_gbps": bw / 1e6,
        "shapes": {
            "heads": HEADS,
            "kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "block_size": BLOCK_SIZE,
            "dtype": str(DTYPE),
        },  # fmt: skip
        "launch": {
            k: getattr(paged_attention, k.upper()) for k in TUNE_GRID
        },  # tile: for head_dim 128
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
