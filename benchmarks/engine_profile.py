"""Where an engine step's time goes: kernel tables of a decode step and of prefills, on one GPU.

Builds the same random 7B-shaped model and rank-16 adapters as ``decode_step.py``, then, under
``torch.profiler`` (CPU and CUDA activities):

- decode at ``--batch`` rows, each on its own adapter (``--no-adapters``: the base alone): graph
  replays, and the same step eager (the launches' host time shows as the gap between CPU and
  CUDA totals);
- prefill of 1 and ``--prefill-prompts`` prompts of ``--prompt-tokens`` tokens, each prompt on
  its own adapter, timed with CUDA events and wall clock;
- a mixed step: all but one of the decode rows above as one-token chunks, then one prompt, in
  one prefill forward (what serving runs when a prompt joins running rows).

``--quantize FMT`` profiles a quantized base (fp8, int8, nf4, int4); ``--no-prefill`` skips the
prefills. Prints one kernel table per case (top rows by device time) and writes them with the
timings to ``--out`` (a directory). Nothing here is asserted: it is for reading before tuning.

    python benchmarks/engine_profile.py --out /tmp/profile
    python benchmarks/engine_profile.py --batch 1 --no-adapters --no-prefill --quantize fp8 \
        --out /tmp/profile-fp8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from decode_step import SHAPES, build_model, random_adapter
from hotmerge.embedded import byte_level_tokenizer
from hotmerge.engine import EngineConfig
from hotmerge.engine.batch import DecodeRow, PrefillChunk
from hotmerge.engine.loader import build_runner
from torch.profiler import ProfilerActivity, profile


def kernel_table(prof, rows: int) -> str:
    return prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows)


def profiled(fn, iters: int):
    """(wall ms per call, profile) of ``iters`` calls of ``fn`` after two warm-up calls."""
    fn()
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) * 1000 / iters
    return wall, prof


def event_ms(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(True), torch.cuda.Event(True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--prefill-prompts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rows", type=int, default=30, help="kernel table rows")
    parser.add_argument("--quantize", choices=["fp8", "int8", "nf4", "int4"])
    parser.add_argument("--no-adapters", action="store_true", help="decode the base alone")
    parser.add_argument("--no-prefill", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")

    model = build_model(args.shape, device, max_positions=4096)
    per_row = args.context + args.prompt_tokens + 64
    config = EngineConfig(
        max_batch_size=args.batch,
        max_total_tokens=per_row,
        kv_cache_tokens=2 * args.batch * per_row,
        max_loras=args.batch,
        max_lora_rank=args.rank,
        max_prefill_tokens=max(2048, args.prefill_prompts * args.prompt_tokens),
        quantize=args.quantize,
    )
    runner = build_runner("profile", model, byte_level_tokenizer(), config)
    del model
    shapes = runner.module_shapes()
    slots = list(range(args.batch))  # one slot per adapter
    for s in slots:
        runner.adapters.write(s, random_adapter(shapes, args.rank, s))
    blocks = -(-per_row // runner.block_size)
    tables = [list(range(1 + i * blocks, 1 + (i + 1) * blocks)) for i in range(2 * args.batch)]
    report: dict[str, dict] = {}

    def record(name: str, fn, iters: int) -> None:
        gpu_ms = event_ms(fn, iters)
        wall_ms, prof = profiled(fn, iters)
        table = kernel_table(prof, args.rows)
        report[name] = dict(gpu_ms=gpu_ms, wall_ms=wall_ms, table=table)
        (args.out / "engine_profile.json").write_text(json.dumps(report, indent=1))  # each case
        print(f"\n== {name}: {gpu_ms:.3f} ms a call on the GPU (events), {wall_ms:.3f} ms wall "
              f"under the profiler\n{table}")  # fmt: skip

    lora = not args.no_adapters
    rows = [
        DecodeRow(i, 7 + i, args.context, tables[i], slots[i] if lora else -1)
        for i in range(args.batch)
    ]
    size = next(s for s in runner.sizes if s >= args.batch)
    case = f"batch {args.batch} {'distinct' if lora else 'none'} {args.quantize or 'bf16'}"
    with torch.inference_mode():
        runner.buffers.fill(rows, size, runner.block_size)
        graph = runner._graphs[size, lora][0]
        record(f"decode graph {case}", graph.replay, 20)
        record(f"decode eager {case}", lambda: runner._decode_step(size, lora), 10)

    prompt = [(7 * i) % 250 for i in range(args.prompt_tokens)]
    for n in () if args.no_prefill else (1, args.prefill_prompts):
        chunks = [
            PrefillChunk(args.batch + i, prompt, 0, tables[args.batch + i], slots[i], True)
            for i in range(n)
        ]
        record(f"prefill {n} x {args.prompt_tokens} tokens", lambda c=chunks: runner.prefill(c), 5)
    if not args.no_prefill:  # a mixed step: decode rows as one-token chunks, then a prompt
        joined = rows[: args.batch - 1]  # a step holds at most a batch of sequences
        chunks = [
            PrefillChunk(r.seq_id, [r.token_id], r.position, r.block_table, r.slot, True)
            for r in joined
        ] + [PrefillChunk(args.batch, prompt, 0, tables[args.batch], slots[0], True)]
        name = f"mixed {len(joined)} rows + 1 x {args.prompt_tokens} tokens"
        record(name, lambda c=chunks: runner.prefill(c), 5)

    print(f"wrote {args.out / 'engine_profile.json'}")


if __name__ == "__main__":
    main()
