"""Merge latency at Mistral-7B shapes: PEFT per tensor, torch vectorised, hotmerge cold / cached.

32 layers x (q, k, v, o, gate, up, down), bf16, random adapters (never zeros). For each strategy,
rank (16, 64) and adapter count (2, 3, 8): a correctness check of the Triton engine against the
torch reference on the real sizes, then medians of repeated runs timed with CUDA events.
ΔW-space strategies (*_svd) instead report wall times of a few runs, the factorisation's error
against the exact truncated SVD on the first modules, and PEFT's way (full SVD per module)
timed on PEFT_SVD_LAYERS layers and extrapolated (the row says so). The floor
is (N inputs read + 1 output written) / the device-to-device copy bandwidth measured here.
Writes benchmarks/results/merge_latency-<device>-<date>.{json,md} (or --out).

    PYTHONPATH=kernels python benchmarks/merge_latency.py [--peft-reps 2] [--ranks 16 64]
        [--quick] [--tune]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "kernels"), str(ROOT)]

from hotmerge_kernels.merge import (  # noqa: E402
    delta,  # noqa: E402
    merge_adapters,
    reference,
    trim_thresholds,
    triton_merge,
)
from hotmerge_kernels.merge.params import MergeParams, SignMethod, Strategy  # noqa: E402
from hotmerge_kernels.merge.plan import get_plan  # noqa: E402

from tests.kernels.random_adapters import mistral_adapter  # noqa: E402

DENSITY = 0.5


def copy_bandwidth() -> float:
    """Bytes per ms of a 1 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / ms


def peft_per_tensor(adapters, params) -> torch.Tensor | None:
    """The LoRAX way: PEFT's merge_utils (or cat) module by module, tensor by tensor."""
    from peft.utils import merge_utils

    s = params.strategy
    if s is Strategy.SLERP:
        return None
    out = []
    for module in adapters[0].modules:
        if s is Strategy.CAT:
            a = torch.cat(
                [
                    x.tensor(module, "A") * w * x.scaling
                    for x, w in zip(adapters, params.weights, strict=True)
                ]
            )
            b = torch.cat([x.tensor(module, "B") for x in adapters], dim=1)
            out += [a, b]
            continue
        folds = [w * x.scaling for x, w in zip(adapters, params.weights, strict=True)]
        wa = torch.tensor([math.copysign(math.sqrt(abs(f)), f) for f in folds], device="cuda")
        wb = torch.tensor([math.sqrt(abs(f)) for f in folds], device="cuda")
        for part, w in (("A", wa), ("B", wb)):
            ts = [x.tensor(module, part) for x in adapters]
            if s is Strategy.LINEAR:
                out.append(merge_utils.task_arithmetic(ts, w))
            elif s is Strategy.MAGNITUDE_PRUNE:
                out.append(merge_utils.magnitude_prune(ts, w, params.density))
            elif s is Strategy.TIES:
                out.append(merge_utils.ties(ts, w, params.density, params.sign_method.value))
            elif s is Strategy.DARE_LINEAR:
                out.append(merge_utils.dare_linear(ts, w, params.density))
            elif s is Strategy.DARE_TIES:
                out.append(merge_utils.dare_ties(ts, w, params.density, params.sign_method.value))
    return out[-1]


def wall_ms(fn, reps: int) -> float:
    """Median of ``reps`` synchronised runs, after one warm-up when a run is short."""
    times = []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = (time.perf_counter() - t0) * 1e3
    if first > 500:
        times.append(first)
    while len(times) < reps:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def clear(adapters):
    for a in adapters:
        a.cache.pop(("trim_thresholds", DENSITY), None)
        a.cache.pop(("delta_thresholds", DENSITY), None)


def check(got: torch.Tensor, want: torch.Tensor) -> tuple[int, float]:
    """(elements further apart than one bf16 rounding, largest difference)."""
    diff = (got.float() - want.float()).abs()
    atol = 1e-6 * float(want.float().abs().max())
    bad = int((diff > atol + 2**-7 * want.float().abs()).sum())
    return bad, float(diff.max())


def run_case(adapters, strategy, args) -> dict:
    n = len(adapters)
    params = MergeParams(
        strategy, tuple(0.5 + i / n for i in range(n)), DENSITY, SignMethod.TOTAL, seed=1234
    )
    # Correctness on the real sizes first: Triton engine against the torch reference.
    clear(adapters)
    want = merge_adapters(adapters, params, backend="torch").adapter.buffer
    clear(adapters)
    got = merge_adapters(adapters, params, backend="triton").adapter.buffer
    bad, worst = check(got, want)
    del want, got

    def cold(backend):
        clear(adapters)
        return merge_adapters(adapters, params, backend=backend)

    row = {
        "strategy": strategy.value,
        "n_adapters": n,
        "rank": adapters[0].rank,
        "dtype": "bfloat16",
        "mismatches": bad,
        "max_abs_diff": worst,
    }
    row["torch_ms"] = wall_ms(lambda: cold("torch"), args.torch_reps)
    row["hotmerge_cold_ms"] = do_bench(
        lambda: cold("triton"), warmup=20, rep=100, return_mode="median"
    )
    merge_adapters(adapters, params, backend="triton")  # fills the threshold cache
    row["hotmerge_cached_ms"] = do_bench(
        lambda: merge_adapters(adapters, params, backend="triton"),
        warmup=20,
        rep=100,
        return_mode="median",
    )
    if strategy is Strategy.SLERP or n > args.peft_max_n:
        row["peft_ms"] = None
    else:
        row["peft_ms"] = wall_ms(lambda: peft_per_tensor(adapters, params), args.peft_reps)
    return row


PEFT_SVD_LAYERS = 2  # PEFT's full SVD per module is ~1 s: timed on this many layers, scaled


def run_svd_case(adapters, strategy, args) -> dict:
    """A ΔW-space strategy: hotmerge cold (no cached thresholds) and cached-thresholds wall
    times, the rank-r accuracy of the factorisation against the exact truncated SVD of the same
    merged ΔW (Frobenius error ratio, the contract is <= 1.001; the first module of each
    factorised group), the device memory a merge allocates beyond what is already held
    (``svd_peak_extra_mb``, output included), and PEFT's way (ΔW in the
    adapters' dtype, merge_utils, full torch.linalg.svd per module) timed on PEFT_SVD_LAYERS
    layers and extrapolated to all of them."""
    n = len(adapters)
    params = MergeParams(
        strategy, tuple(0.5 + i / n for i in range(n)), DENSITY, SignMethod.TOTAL, seed=1234
    )
    ratios = []
    original = delta.low_rank

    def measured(m, rank, **kw):
        found = original(m, rank, **kw)
        if len(ratios) < args.svd_accuracy_modules:
            first = (0,) * (m.dim() - 2)  # the first matrix of each factorised group
            m, u, s, vh = m[first], found[0][first], found[1][first], found[2][first]
            exact = torch.linalg.svdvals(m)
            tail = torch.sqrt((exact[rank:] ** 2).sum())
            ratios.append(float(torch.linalg.matrix_norm(m - (u * s) @ vh) / tail))
        return found

    delta.low_rank = measured
    try:
        clear(adapters)
        merge_adapters(adapters, params)  # warm-up (compiles), also the accuracy sample
    finally:
        delta.low_rank = original

    def cold():
        clear(adapters)
        return merge_adapters(adapters, params)

    row = {
        "strategy": strategy.value,
        "n_adapters": n,
        "rank": adapters[0].rank,
        "dtype": "bfloat16",
        "mismatches": None,
        "svd_error_ratio_max": max(ratios) if ratios else None,
        "svd_error_modules": len(ratios),
        "torch_ms": None,
        "hotmerge_cold_ms": wall_ms(cold, args.svd_reps),
        "hotmerge_cached_ms": wall_ms(lambda: merge_adapters(adapters, params), args.svd_reps),
    }
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    merge_adapters(adapters, params)
    row["svd_peak_extra_mb"] = (torch.cuda.max_memory_allocated() - before) / 1e6
    modules = [m for m in adapters[0].modules if int(m.split(".")[2]) < PEFT_SVD_LAYERS]
    layers = len({m.split(".")[2] for m in adapters[0].modules})
    if n > args.peft_max_n:
        row["peft_ms"] = None
    else:
        peft_some = wall_ms(lambda: peft_svd(adapters, params, modules), 1)
        row["peft_ms"] = peft_some * layers / PEFT_SVD_LAYERS
        row["peft_note"] = f"timed on {PEFT_SVD_LAYERS} of {layers} layers, extrapolated"
    return row


def peft_svd(adapters, params, modules) -> None:
    """PEFT's _svd_generalized_task_arithmetic_weighted_adapter, module by module."""
    from peft.utils import merge_utils

    combine = {
        Strategy.SVD: lambda d, w: merge_utils.task_arithmetic(d, w),
        Strategy.TIES_SVD: lambda d, w: merge_utils.ties(d, w, DENSITY, "total"),
        Strategy.DARE_LINEAR_SVD: lambda d, w: merge_utils.dare_linear(d, w, DENSITY),
        Strategy.DARE_TIES_SVD: lambda d, w: merge_utils.dare_ties(d, w, DENSITY, "total"),
        Strategy.MAGNITUDE_PRUNE_SVD: lambda d, w: merge_utils.magnitude_prune(d, w, DENSITY),
    }[params.strategy]
    weights = torch.tensor(params.weights, device="cuda")
    rank = max(a.rank for a in adapters)
    for module in modules:
        deltas = [a.tensor(module, "B") @ a.tensor(module, "A") * a.scaling for a in adapters]
        u, s, vh = torch.linalg.svd(combine(deltas, weights), full_matrices=True)
        _ = (u[:, :rank] @ torch.diag(s[:rank]), vh[:rank])
    torch.cuda.synchronize()


def breakdown(adapters) -> dict:
    """Where TIES's time goes (N adapters): thresholds alone, the merge kernel alone (its launch
    included), and the whole API call, cold and cached."""
    params = MergeParams(Strategy.TIES, (1.0,) * len(adapters), DENSITY)
    plan = get_plan(adapters, cat=False)
    out = torch.empty(plan.total, dtype=adapters[0].dtype, device="cuda")
    thresholds = trim_thresholds(adapters, DENSITY)
    weights = torch.ones(2, len(adapters))

    def kernel(mode, elect):
        triton_merge.elementwise_merge(
            out, plan, [a.buffer for a in adapters], weights, per_segment=False,
            thresholds=thresholds, mode=mode, elect=elect, density=DENSITY, seed=1,
        )  # fmt: skip

    def thr():
        clear(adapters)
        trim_thresholds(adapters, DENSITY)

    def bench(fn):
        return do_bench(fn, warmup=20, rep=100, return_mode="median")

    result = {
        "n_adapters": len(adapters),
        "rank": adapters[0].rank,
        "thresholds_ms": bench(thr),
        "ties_kernel_ms": bench(lambda: kernel(reference.MODE_TRIM, reference.ELECT_TOTAL)),
        "linear_kernel_ms": bench(lambda: kernel(reference.MODE_NONE, reference.ELECT_NONE)),
        "dare_linear_kernel_ms": bench(lambda: kernel(reference.MODE_DARE, reference.ELECT_NONE)),
        "dare_ties_kernel_ms": bench(lambda: kernel(reference.MODE_DARE, reference.ELECT_TOTAL)),
    }
    trim_thresholds(adapters, DENSITY)
    result["ties_api_cached_ms"] = bench(lambda: merge_adapters(adapters, params))

    def ties_cold():
        clear(adapters)
        merge_adapters(adapters, params)

    result["ties_api_cold_ms"] = bench(ties_cold)
    trim_thresholds(adapters, DENSITY)
    return result


MERGE_CONFIGS = [(512, 4), (1024, 2), (1024, 4), (1024, 8), (2048, 4)]  # (BLOCK, num_warps)
THRESHOLD_CONFIGS = [
    (1024, 4, 4096), (2048, 8, 4096), (512, 4, 4096), (1024, 4, 8192),
]  # (BLOCK, num_warps, sample) # fmt: skip


def tune(adapters) -> list[dict]:
    """Kernel-alone times of a few launch shapes (merge kernel per mode, threshold kernel)."""
    plan = get_plan(adapters, cat=False)
    out = torch.empty(plan.total, dtype=adapters[0].dtype, device="cuda")
    thresholds = trim_thresholds(adapters, DENSITY)
    weights = torch.ones(2, len(adapters))
    buffers = [a.buffer for a in adapters]
    modes = {
        "linear": (reference.MODE_NONE, reference.ELECT_NONE),
        "ties": (reference.MODE_TRIM, reference.ELECT_TOTAL),
        "dare_linear": (reference.MODE_DARE, reference.ELECT_NONE),
        "dare_ties": (reference.MODE_DARE, reference.ELECT_TOTAL),
    }
    rows = []
    for block, warps in MERGE_CONFIGS:
        row = {"kernel": "merge", "block": block, "num_warps": warps}
        for name, (mode, elect) in modes.items():
            fn = functools.partial(
                triton_merge.elementwise_merge, out, plan, buffers, weights, per_segment=False,
                thresholds=thresholds, mode=mode, elect=elect, density=DENSITY, seed=1,
                block=block, num_warps=warps,
            )  # fmt: skip
            row[f"{name}_ms"] = do_bench(fn, warmup=20, rep=100, return_mode="median")
        rows.append(row)
        print("tune:", _fmt_dict(row), flush=True)
    want = [t.clone() for t in thresholds]
    for block, warps, sample in THRESHOLD_CONFIGS:
        fn = functools.partial(
            triton_merge.segment_thresholds, adapters, DENSITY, block=block, num_warps=warps,
            sample=sample,
        )  # fmt: skip
        same = all(torch.equal(g, w) for g, w in zip(fn(), want, strict=True))
        ms = do_bench(fn, warmup=20, rep=100, return_mode="median")
        row = {"kernel": "thresholds", "block": block, "num_warps": warps, "sample": sample}
        row.update(ms=ms, same=same)
        rows.append(row)
        print("tune:", _fmt_dict(row), flush=True)
    for strategy in (Strategy.TIES, Strategy.DARE_TIES):
        host_profile(adapters, strategy)
    return rows


def host_profile(adapters, strategy: Strategy, calls: int = 200) -> None:
    """Where the host time of a cached merge_adapters call goes (cProfile, top entries)."""
    import cProfile
    import pstats

    params = MergeParams(strategy, (1.0,) * len(adapters), DENSITY)
    trim_thresholds(adapters, DENSITY)
    merge_adapters(adapters, params)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        merge_adapters(adapters, params)
    wall = (time.perf_counter() - t0) * 1e3 / calls
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        merge_adapters(adapters, params)
    prof.disable()
    print(f"host profile: {calls} cached {strategy.value} calls, {wall:.3f} ms a call", flush=True)
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    p.add_argument("--ns", type=int, nargs="+", default=[2, 3, 8])
    p.add_argument("--strategies", nargs="+", default=[s.value for s in Strategy])
    p.add_argument("--peft-reps", type=int, default=2, help="timed PEFT runs after one warm-up")
    p.add_argument("--peft-max-n", type=int, default=8, help="skip PEFT above this many adapters")
    p.add_argument("--torch-reps", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--quick", action="store_true", help="N = 3, rank 16, every strategy")
    p.add_argument("--tune", action="store_true", help="also time a few launch shapes")
    p.add_argument("--svd-reps", type=int, default=2, help="timed runs of a ΔW-space merge")
    p.add_argument(
        "--svd-accuracy-modules", type=int, default=14, help="modules checked against exact SVD"
    )
    args = p.parse_args()
    if args.quick:
        args.ranks, args.ns = [16], [3]

    import peft

    bandwidth = copy_bandwidth()
    device = torch.cuda.get_device_name()
    print(f"{device}: device-to-device copy {bandwidth / 1e9:.3f} TB/s", flush=True)
    rows = []
    meta = {
        "device": device,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": triton.__version__,
            "peft": peft.__version__,
        },
        "copy_bandwidth_tb_s": bandwidth / 1e9,
        "density": DENSITY,
        "results": rows,
    }
    for rank in args.ranks:
        pool = [mistral_adapter(rank, seed) for seed in range(max(args.ns))]
        nbytes = pool[0].nbytes
        meta.setdefault("breakdown", []).append(breakdown(pool[:3]))
        print("breakdown:", _fmt_dict(meta["breakdown"][-1]), flush=True)
        if args.tune:
            meta.setdefault("tune", []).extend(tune(pool[:3]))
        for n in args.ns:
            for name in args.strategies:
                strategy = Strategy(name)
                if strategy is Strategy.SLERP and n != 2:
                    continue
                t0 = time.perf_counter()
                case = run_svd_case if strategy.in_delta_space else run_case
                row = case(pool[:n], strategy, args)
                row["case_s"] = time.perf_counter() - t0
                out_bytes = n * nbytes if strategy is Strategy.CAT else nbytes
                row["floor_ms"] = (n * nbytes + out_bytes) / bandwidth
                row["adapter_mb"] = nbytes / 1e6
                rows.append(row)
                print(_line(row), flush=True)
                _write(args.out, meta)  # after every case, so a cut-off run keeps its rows
        del pool
        torch.cuda.empty_cache()

    print(_table(rows))


def _write(out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    date = meta["date"][:10]
    stem = f"merge_latency-{meta['device'].replace(' ', '_')}-{date}"
    (out / f"{stem}.json").write_text(json.dumps(meta, indent=2))
    (out / f"{stem}.md").write_text(
        f"# Merge latency, {meta['device']}, {meta['date']}\n\n"
        f"copy bandwidth {meta['copy_bandwidth_tb_s']:.3f} TB/s; versions {meta['versions']}; "
        f"density {meta['density']}; times in ms (median)\n\n{_table(meta['results'])}\n"
        + "".join(f"\nbreakdown: {_fmt_dict(b)}\n" for b in meta.get("breakdown", []))
    )


COLUMNS = ["strategy", "n_adapters", "rank", "floor_ms", "peft_ms", "torch_ms",
           "hotmerge_cold_ms", "hotmerge_cached_ms", "mismatches", "svd_error_ratio_max",
           "svd_peak_extra_mb", "peft_note"]  # fmt: skip


def _fmt(v):
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _fmt_dict(d):
    return "  ".join(f"{k}={_fmt(v)}" for k, v in d.items())


def _line(row):
    return "  ".join(f"{c}={_fmt(row.get(c))}" for c in COLUMNS)


def _table(rows):
    head = "| " + " | ".join(COLUMNS) + " | x PEFT (cached) |"
    sep = "|" + "---|" * (len(COLUMNS) + 1)
    lines = [head, sep]
    for r in rows:
        speedup = r["peft_ms"] / r["hotmerge_cached_ms"] if r["peft_ms"] else None
        cells = [_fmt(r.get(c)) for c in COLUMNS] + [f"{speedup:.0f}" if speedup else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
