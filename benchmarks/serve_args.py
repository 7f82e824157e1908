"""``serve_load.py``'s command line: its options, checked, with the concurrency levels parsed."""

from __future__ import annotations

import argparse
from pathlib import Path

from hotmerge.engine import EngineConfig


def parse_args(description: str, shapes: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--shape", choices=shapes, default="7b")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument(
        "--concurrency",
        default="32",
        help="comma-separated: one load phase per level, on the same server (default: 32)",
    )
    parser.add_argument("--single", type=float, default=0.4, help="share of named-adapter requests")
    parser.add_argument("--repeated", type=float, default=0.4, help="share of repeated specs")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--cold-runs", type=int, default=10)
    parser.add_argument("--hit-reps", type=int, default=2000)
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=32,
        help="1-256; decode CUDA graphs are captured for the powers of two below it and for it",
    )
    parser.add_argument("--max-loras", type=int, default=48, help="adapter slots")
    parser.add_argument("--max-total-tokens", type=int, default=1024)
    parser.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=EngineConfig.max_prefill_tokens,
        help="prompt tokens one step prefills, the decode rows of a mixed step included",
    )
    parser.add_argument(
        "--quantize", default=None, help="quantize the base's linear weights: fp8, int8, nf4, int4"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the engine thread (its steps and admissions)",
    )
    parser.add_argument(
        "--no-plan-ahead",
        dest="plan_ahead",
        action="store_false",
        help="the engine waits for each step's tokens before launching the next",
    )
    parser.add_argument(
        "--plan-ahead-ab",
        action="store_true",
        help="run each level twice on the same server: steps planned ahead, then waiting first",
    )
    parser.add_argument(
        "--switch-interval-ms",
        type=float,
        default=None,
        help="the server process's GIL switch interval (sys.setswitchinterval; Python's "
        "default: 5 ms): how long the engine thread may wait for the GIL after a torch call "
        "while the front's threads hold it",
    )
    parser.add_argument(
        "--in-process-clients",
        action="store_true",
        help="run the load's clients as threads of the server's process (they share its GIL)",
    )
    parser.add_argument(
        "--merge-streams",
        type=int,
        default=None,
        help="streams running while a ties_svd merge is computed (default: the first "
        "--concurrency; 0 skips that phase)",
    )
    parser.add_argument("--merge-tokens", type=int, default=256, help="new tokens per stream")
    parser.add_argument(
        "--prefix-runs",
        type=int,
        default=10,
        help="requests per side of the shared-prefix TTFT phase (0 skips it)",
    )
    parser.add_argument(
        "--merge-profile-runs",
        type=int,
        default=0,
        help="fresh TIES merges resolved on the bench thread under torch's profiler, idle "
        "engine (0, the default, skips it): where a merge's time outside its kernels goes",
    )
    parser.add_argument("--prefix-tokens", type=int, default=512, help="the shared prefix's length")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--tag", default="", help="suffix of the result files' names")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if not 1 <= args.max_batch_size <= 256:
        parser.error(f"--max-batch-size must be 1-256, got {args.max_batch_size}")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.merge_streams is None:
        args.merge_streams = args.concurrency[0]
    return args
