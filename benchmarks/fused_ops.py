"""Fused decode elementwise kernels vs their eager torch twins, at Llama-7B sizes, on CUDA.

hidden 4096, 32 / 8 heads of 128, intermediate 14336, bf16. Each op is captured in a CUDA graph
of --reps calls (as the 32 layers of a decode step run it, so launch overhead counts as in the
engine's graph) and the replay is timed (median, triton's do_bench); per call = replay / reps.
The calls of a graph reuse one set of buffers, so the small cases run from L2, as a layer's
activations do, fresh from the matmul that wrote them.
Before timing, every fused op is checked against its twin on the same inputs. Prints a table and
writes JSON to --out (default benchmarks/results/fused_ops-<device>-<date>.json) and a .md beside.

    PYTHONPATH=kernels python benchmarks/fused_ops.py [--tokens 1 32 64 512] [--reps 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "kernels"), str(ROOT)]

from hotmerge_kernels.ops import fused, reference  # noqa: E402

from tests.kernels.decode_inputs import SEVEN_B, DecodeInputs, decode_inputs  # noqa: E402

EPS = 1e-5


def cases(inp: DecodeInputs, kernels: bool) -> dict[str, tuple[Callable[[], object], int]]:
    """{op: (one call on preallocated buffers, bytes it must move)} for one implementation:
    the Triton kernels, or their torch twins."""
    s, T, e = inp.sizes, inp.x.shape[0], inp.x.element_size()
    impl = fused if kernels else reference
    norm, rotary, silu = impl.rms_norm, impl.rotary_and_cache, impl.silu_and_mul
    normed = torch.empty_like(inp.x)
    q, k, v = inp.qkv_views()
    q_normed = torch.empty_like(q)
    act = torch.empty(T, s.intermediate, dtype=inp.x.dtype, device=inp.x.device)
    q_heads, kv_heads = T * s.num_heads * s.head_dim, T * s.num_kv_heads * s.head_dim
    return {
        "add_rms_norm": (
            lambda: norm(inp.x, inp.norm_weight, EPS, residual=inp.residual, out=normed),
            4 * T * s.hidden * e,  # read x, residual; write residual, out
        ),
        "q_norm_per_head": (
            lambda: norm(q, inp.head_norm_weight, EPS, out=q_normed),
            2 * q_heads * e,
        ),
        "rotary_and_cache": (
            lambda: rotary(
                q,
                k,
                v,
                inp.positions,
                inp.cos,
                inp.sin,
                inp.k_cache,
                inp.v_cache,
                inp.slot_mapping,
            ),  # fmt: skip
            (2 * q_heads + 2 * kv_heads + 3 * kv_heads) * e + T * s.head_dim * 4,
        ),
        "silu_and_mul": (lambda: silu(inp.gate_up, act), 3 * T * s.intermediate * e),
    }


def check(inp: DecodeInputs) -> dict[str, float]:
    """Largest |fused - twin| of every op's outputs, on the same fresh inputs."""
    a, b = inp.clone(), inp.clone()
    kernel, twin = cases(a, kernels=True), cases(b, kernels=False)
    diffs = {}
    for op in kernel:
        got, want = kernel[op][0](), twin[op][0]()
        if op == "rotary_and_cache":
            got, want = (a.qkv, a.k_cache, a.v_cache), (b.qkv, b.k_cache, b.v_cache)
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        diffs[op] = max(
            float((g.float() - w.float()).abs().max()) for g, w in zip(got, want, strict=True)
        )
    return diffs


def graph_ms(call: Callable[[], object], reps: int) -> float:
    """Median ms of one replay of a CUDA graph holding ``reps`` calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compile and warm up outside the capture
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            call()
    return do_bench(graph.replay, warmup=25, rep=200, return_mode="median")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 64, 512])
    p.add_argument("--reps", type=int, default=32, help="calls in one graph (layers)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    device = torch.cuda.get_device_name()
    date = datetime.now(UTC).isoformat(timespec="seconds")
    out = args.out or ROOT / "benchmarks" / "results" / (
        f"fused_ops-{device.replace(' ', '_')}-{date[:10]}.json"
    )
    rows = []
    meta = {
        "device": device,
        "date": date,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": triton.__version__,
        },
        "sizes": vars(SEVEN_B),
        "dtype": args.dtype,
        "reps_per_graph": args.reps,
        "results": rows,
    }
    for T in args.tokens:
        inp = decode_inputs(T, dtype, "cuda", seed=T)
        diffs = check(inp)
        timed = {}
        for kernels in (False, True):
            for op, (call, nbytes) in cases(inp.clone(), kernels).items():
                timed[op, kernels] = (graph_ms(call, args.reps) / args.reps * 1e3, nbytes)
        for op in diffs:
            torch_us, nbytes = timed[op, False]
            fused_us, _ = timed[op, True]
            rows.append({
                "op": op, "tokens": T, "torch_us": torch_us, "fused_us": fused_us,
                "speedup": torch_us / fused_us, "fused_gb_s": nbytes / fused_us / 1e3,
                "max_abs_diff": diffs[op],
            })  # fmt: skip
            print(_line(rows[-1]), flush=True)
        _write(out, meta)  # after every size, so a cut-off run keeps its rows
    print(f"\n{device}, {args.dtype}, {args.reps} calls a graph, us per call (median)\n")
    print(_table(rows))
    print(f"\nwrote {out}")


COLUMNS = ["op", "tokens", "torch_us", "fused_us", "speedup", "fused_gb_s", "max_abs_diff"]


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _line(row: dict) -> str:
    return "  ".join(f"{c}={_fmt(row[c])}" for c in COLUMNS)


def _table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def _write(out: Path, meta: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(meta, indent=2))
    out.with_suffix(".md").write_text(
        f"# Fused decode ops, {meta['device']}, {meta['date']}\n\n"
        f"{meta['dtype']}; {meta['reps_per_graph']} calls a CUDA graph; versions "
        f"{meta['versions']}; us per call (median)\n\n{_table(meta['results'])}\n"
    )


if __name__ == "__main__":
    main()
