"""Trim thresholds and the element-wise merge kernel on one GPU, kernel by kernel.

Mistral-7B shapes, N = 3 rank-16 bf16 adapters (the ``merge_latency --quick`` case), and three
float32 ΔW-sized tensors (4096 x 14336, as ``ties_svd`` sees them). For each: the thresholds
checked against the torch reference, how many tensors the first pass leaves unfinished, each
kernel's device time (torch.profiler), the wall time of a cold call and its host time alone
(launches, no sync). ``--baseline DIR`` times an older ``hotmerge_kernels`` package in DIR too.
Prints a table; ``--out FILE`` writes the numbers as JSON.

    PYTHONPATH=kernels python benchmarks/thresholds.py [--baseline DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "kernels"), str(ROOT)]

from hotmerge_kernels.layout import FlatAdapter, Segment  # noqa: E402
from hotmerge_kernels.merge import reference, triton_merge  # noqa: E402
from hotmerge_kernels.merge.plan import get_plan  # noqa: E402
from hotmerge_kernels.merge.thresholds import THRESHOLD_SAMPLE, select  # noqa: E402

from tests.kernels.random_adapters import mistral_adapter  # noqa: E402

DENSITY = 0.5
CONFIGS = [(2048, 8, 4096), (1024, 4, 8192)]  # (block, warps, sample) besides the defaults


def bench(fn) -> float:
    return do_bench(fn, warmup=20, rep=200, return_mode="median")


def kernel_times(fn, reps: int = 20) -> dict[str, float]:
    """Device ms per call of each kernel ``fn`` launches (profiler, mean over ``reps`` calls)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    times = {}
    for e in prof.key_averages():
        total = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if total:
            times[e.key[:60]] = total / 1e3 / reps
    return times


def host_ms(fn, reps: int = 50) -> float:
    """Host time of one call (launches only, the device not waited for)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    ms = (time.perf_counter() - t0) * 1e3 / reps
    torch.cuda.synchronize()
    return ms


def unfinished(adapters, density, sample) -> int:
    """Tensors the guess and the multi-program passes leave to the in-program finisher."""
    _, state = select(adapters, density, sample=sample, finish=False)
    return int((state[0] < state[1]).sum())


def case(name, adapters, baseline) -> dict:
    row = {"case": name, "tensors": sum(len(a.segments) for a in adapters)}
    row["mb"] = sum(a.nbytes for a in adapters) / 1e6
    want = reference.segment_thresholds(adapters, DENSITY)
    got = triton_merge.segment_thresholds(adapters, DENSITY)
    row["equal"] = all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    row["left_to_finisher"] = unfinished(adapters, DENSITY, THRESHOLD_SAMPLE)
    fn = lambda: triton_merge.segment_thresholds(adapters, DENSITY)  # noqa: E731
    row["ms"] = bench(fn)
    row["host_ms"] = host_ms(fn)
    row["kernels"] = kernel_times(fn)
    row["configs"] = []
    for block, warps, sample in CONFIGS:
        f = functools.partial(
            triton_merge.segment_thresholds, adapters, DENSITY, block=block, num_warps=warps,
            sample=sample,
        )  # fmt: skip
        same = all(torch.equal(g, w) for g, w in zip(f(), want, strict=True))
        cfg = {"block": block, "warps": warps, "sample": sample, "equal": same, "ms": bench(f)}
        cfg["unfinished"] = unfinished(adapters, DENSITY, sample) if block == 1024 else None
        row["configs"].append(cfg)
    if baseline is not None:
        old = lambda: baseline.triton_merge.segment_thresholds(adapters, DENSITY)  # noqa: E731
        row["baseline_equal"] = all(torch.equal(g, w) for g, w in zip(old(), want, strict=True))
        row["baseline_ms"] = bench(old)
        row["baseline_host_ms"] = host_ms(old)
        row["baseline_kernels"] = kernel_times(old)
    return row


def merge_kernels(adapters, baseline) -> dict:
    """The element-wise merge kernel alone per mode, 16-byte accesses (aligned) or not."""
    plan = get_plan(adapters, cat=False)
    out = torch.empty(plan.total, dtype=adapters[0].dtype, device="cuda")
    thresholds = triton_merge.segment_thresholds(adapters, DENSITY)
    buffers = [a.buffer for a in adapters]
    weights = torch.ones(2, len(adapters))
    modes = {
        "linear": (reference.MODE_NONE, reference.ELECT_NONE),
        "ties": (reference.MODE_TRIM, reference.ELECT_TOTAL),
        "dare_linear": (reference.MODE_DARE, reference.ELECT_NONE),
        "dare_ties": (reference.MODE_DARE, reference.ELECT_TOTAL),
    }
    result = {}
    for name, (mode, elect) in modes.items():

        def run(engine=triton_merge, mode=mode, elect=elect):
            engine.elementwise_merge(
                out, plan, buffers, weights, per_segment=False, thresholds=thresholds,
                mode=mode, elect=elect, density=DENSITY, seed=1,
            )  # fmt: skip

        run()
        want = out.clone()
        result[f"{name}_ms"] = bench(run)
        plan.aligned = False
        run()
        result[f"{name}_same_unaligned"] = bool(torch.equal(out, want))
        result[f"{name}_unaligned_ms"] = bench(run)
        plan.aligned = True
        if baseline is not None:
            result[f"{name}_baseline_ms"] = bench(lambda: run(baseline.triton_merge))
    return result


def load_baseline(path: Path):
    spec = importlib.util.spec_from_file_location(
        "baseline_kernels", path / "__init__.py", submodule_search_locations=[str(path)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_kernels"] = module
    spec.loader.exec_module(module)
    importlib.import_module("baseline_kernels.triton_merge")
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", type=Path, help="a directory holding an older hotmerge_kernels")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    baseline = load_baseline(args.baseline) if args.baseline else None
    rows = []
    ads = [mistral_adapter(16, seed) for seed in range(3)]
    rows.append(case("7B r16 bf16 N=3", ads, baseline))
    merge = merge_kernels(ads, baseline)
    del ads
    gen = torch.Generator(device="cuda").manual_seed(0)
    seg = Segment("delta", "A", 0, (14336, 4096))
    deltas = [
        FlatAdapter(torch.randn(seg.numel, generator=gen, device="cuda") * 1e-3, (seg,), 0, 1.0)
        for _ in range(3)
    ]
    rows.append(case("ΔW 14336x4096 fp32 x3", deltas, baseline))
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows,
                                        "merge": merge}, indent=2))  # fmt: skip
    for r in rows:
        print(json.dumps(r))
    print(json.dumps(merge))


if __name__ == "__main__":
    main()
