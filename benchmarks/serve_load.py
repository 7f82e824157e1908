"""Serving benchmark: drive a hotmerge server over gRPC with a mix of adapter and merge requests.

It starts the server in this process on a random-weight model built from a config (7B-shaped by
default: Llama/Mistral layer sizes, bf16; random weights are fine for timing), writes rank-16
PEFT adapters on all seven projection modules, then measures, over real gRPC on loopback:

1. the cost a merge-cache hit adds over a named adapter (server side, in-process, median);
2. a cold TIES merge of 3 adapters as a share of time to first token for a 128-token prompt;
3. the time to first token of prompts that share a 512-token prefix (cached after the first)
   against prompts of the same length that share nothing, one at a time;
4. a load of mixed requests (single adapters, repeated merge specs, fresh merge specs) at each
   ``--concurrency`` level (``32,64,128``: one phase per level, same server): throughput,
   p50/p99 time to first token, inter-token latency (from the streamed tokens' arrival times)
   and total latency by class (single, merge hit, merge miss), the merge time's share of TTFT
   and each class's queue / merge / prefill time, the decode batch sizes the engine reached,
   tokens/s while all requests of the level were in flight, and where the stalls were: the
   slowest engine steps and admissions, the slowest first tokens, garbage collections
   (``serve_trace.py``);
5. the inter-token latency of ``--merge-streams`` running streams while one fresh ``ties_svd``
   merge is computed, against the same streams' outside the merge.

In 2 and 4 every request has a 128-token prompt of its own, so none finds another's KV in the
prefix cache: a fresh merge never can (its adapter is new), and a named adapter that did would
make the two look further apart than their work is. (Until 2026-12-07 they shared one prompt.)

Results go to benchmarks/results/serve_load-<device>-<date>.{json,md} (or --out-dir).

    python benchmarks/serve_load.py                      # 7B shapes (needs a GPU)
    python benchmarks/serve_load.py --shape tiny --requests 40   # a quick run anywhere
"""

from __future__ import annotations

import cProfile
import datetime as dt
import io
import multiprocessing
import platform
import pstats
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from hotmerge.client import HotmergeClient
from hotmerge.config import ServerConfig
from hotmerge.embedded import (
    ALL_PROJ,
    DemoAdapter,
    byte_level_tokenizer,
    linear_shapes,
    tiny_llama_config,
)
from hotmerge.embedded import write_peft_adapter as write_adapter
from hotmerge.engine import EngineConfig
from hotmerge.server import freeze_startup_objects, start_server
from serve_args import parse_args
from serve_clients import (
    PROMPT_TOKENS,
    Sample,
    prompts,
    run_clients,
    stream_once,
)
from serve_probes import (
    cold_ties_share,
    hit_overhead_us,
    merge_during_streams,
    merge_path_profile,
    shared_prefix_ttft,
)
from serve_report import (
    batch_histogram,
    gaps_ms,
    itl_summary,
    pct,
    tokens_per_s_full,
    ttft_after_burst,
    write_results,
)
from serve_trace import DeviceTimeline, StallTrace

SHAPES = {
    # Mistral-7B / Llama-2-7B-with-GQA layer sizes; the vocabulary is the byte tokenizer's.
    "7b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        initializer_range=0.02,
    ),
    "tiny": dict(),
}


def build_model(model_dir: Path, shape: str, device: str) -> None:
    """A random LlamaForCausalLM of the given shape, built on the device in bf16, saved."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(**SHAPES[shape])
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(model_dir)
    byte_level_tokenizer().save_pretrained(model_dir)
    del model
    torch.cuda.empty_cache() if device == "cuda" else None


def build_adapters(model_dir: Path, root: Path, count: int, rank: int) -> list[str]:
    shapes = linear_shapes(model_dir)
    names = []
    for i in range(count):
        name = f"bench-{i}"
        spec = DemoAdapter(name, ALL_PROJ, alpha=2 * rank, rank=rank)
        write_adapter(root / name, shapes, spec, base_model=str(model_dir), seed=100 + i)
        names.append(name)
    return names


def load_plan(adapter_ids: list[str], args, phase: int = 0) -> list[dict]:
    """Each request's adapter arguments: the mix drawn once; fresh specs never repeat (nor
    across load phases), repeated ones do."""
    rng = random.Random(0)
    repeated = [
        {
            "ids": rng.sample(adapter_ids, 3),
            "weights": [1.0, 0.7, 0.4],
            "merge_strategy": s,
            "density": 0.5,
            "seed": 1,
        }
        for s in ("TIES", "DARE_TIES", "LINEAR", "DARE_LINEAR")
    ]
    plan = []
    for n in range(args.requests):
        r = rng.random()
        if r < args.single:
            plan.append({"adapter_id": rng.choice(adapter_ids)})
        elif r < args.single + args.repeated:
            plan.append({"merged_adapters": rng.choice(repeated)})
        else:
            spec = {
                "ids": rng.sample(adapter_ids, 3),
                "weights": [1.0, 1.0 + 1e-3 * n, 0.5 + 1e-2 * phase],
                "merge_strategy": "TIES",
                "density": 0.5,
            }
            plan.append({"merged_adapters": spec})
    return plan


def load_mix(running, adapter_ids, args, concurrency: int, phase: int) -> dict:
    """A mixed load at a fixed concurrency. The clients run in a process of their own (as
    users' clients do), unless ``--in-process-clients``: then their threads share the
    server's GIL."""
    plan = load_plan(adapter_ids, args, phase)
    clients = (running.target, prompts(len(plan), f"load{phase}"), plan, args.max_new_tokens,
               concurrency)  # fmt: skip
    engine = running.engine
    # The engine thread's steps (profiled with --profile) and admissions, during the load only.
    timeline = DeviceTimeline() if engine.runner.device.type == "cuda" else None
    trace = StallTrace(engine._worker, cProfile.Profile() if args.profile else None, timeline)
    prefills = sum(engine.stats.prefill_batch_sizes.values())
    decodes = sum(engine.stats.decode_batch_sizes.values())
    decode_sizes = engine.stats.decode_batch_sizes + engine.stats.mixed_decode_rows
    phases_before, steps_before = dict(engine.stats.step_phase_s), engine.stats.steps
    ahead_before = engine.stats.steps_planned_ahead
    sched, kv = engine.scheduler, engine.kv
    kv_before = (sched.mixed_plans, sched.preemptions, kv.queries, kv.hits)
    if args.in_process_clients:
        pool = None
    else:  # started (torch imported) before the load: start-up is not timed
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        pool.submit(time.sleep, 0).result()
    try:
        with trace:
            if pool is None:
                rows, wall = run_clients(*clients)
            else:
                rows, wall = pool.submit(run_clients, *clients).result()
        samples = [Sample(*x) for x in rows]
    finally:
        if pool is not None:
            pool.shutdown()
    step_s = trace.step_seconds
    counted = max(engine.stats.steps - steps_before, 1)
    phase_ms = {
        phase: 1000 * (total - phases_before.get(phase, 0.0)) / counted
        for phase, total in sorted(engine.stats.step_phase_s.items())
    }
    steps = {
        "steps": len(step_s),
        "prefills": sum(engine.stats.prefill_batch_sizes.values()) - prefills,
        "decodes": sum(engine.stats.decode_batch_sizes.values()) - decodes,
        "step_ms_p50": pct([1000 * s for s in step_s], 50),
        "step_ms_p99": pct([1000 * s for s in step_s], 99),
        "engine_busy_share": sum(step_s) / wall,
        # Mean ms a step spends in each phase (the engine's own timers; "wait" is the device).
        "phase_ms_per_step": phase_ms,
        # Steps by the number of rows decoded (decode-only and mixed steps): the batch sizes
        # the load really reached.
        "decode_batch_sizes": batch_histogram(
            decode_sizes, engine.stats.decode_batch_sizes + engine.stats.mixed_decode_rows
        ),
        # Steps whose decode rows went into the prefill forward (counted in "prefills"), rows
        # preempted, prompt tokens found in the prefix cache.
        "mixed_steps": sched.mixed_plans - kv_before[0],
        # Launched before the step in flight's tokens were on the host (the rest waited first).
        "planned_ahead": engine.stats.steps_planned_ahead - ahead_before,
        "preemptions": sched.preemptions - kv_before[1],
        "prefix_hit_rate": (kv.hits - kv_before[3]) / max(kv.queries - kv_before[2], 1),
    }
    if trace.profile is not None:
        out = io.StringIO()
        pstats.Stats(trace.profile, stream=out).sort_stats("cumulative").print_stats(40)
        steps["profile_top"] = out.getvalue()
    by_kind = {}
    for kind in ("single", "merge_hit", "merge_miss"):
        chosen = [s for s in samples if s.kind == kind]
        itl = itl_summary([g for s in chosen for g in gaps_ms(s.token_times)])
        by_kind[kind] = {
            "count": len(chosen),
            "ttft_ms_p50": pct([s.ttft_ms for s in chosen], 50),
            "ttft_ms_p99": pct([s.ttft_ms for s in chosen], 99),
            "total_ms_p50": pct([s.total_ms for s in chosen], 50),
            "total_ms_p99": pct([s.total_ms for s in chosen], 99),
            "merge_share_of_ttft_p50": pct([s.merge_ms / s.ttft_ms for s in chosen], 50),
            # Where the first token's time went, by the server's timings (p50 each).
            "queue_ms_p50": pct([s.queue_ms for s in chosen], 50),
            "merge_ms_p50": pct([s.merge_ms for s in chosen], 50),
            "prefill_ms_p50": pct([s.prefill_ms for s in chosen], 50),
            "itl_ms_p50": itl["itl_ms_p50"],
            "itl_ms_p99": itl["itl_ms_p99"],
        }
    return {
        "requests": len(samples),
        "concurrency": concurrency,
        "mix": {
            "single": args.single,
            "repeated": args.repeated,
            "fresh": round(1 - args.single - args.repeated, 3),
        },
        "max_new_tokens": args.max_new_tokens,
        "max_batch_size": args.max_batch_size,
        "max_prefill_tokens": args.max_prefill_tokens,
        "itl": itl_summary([g for s in samples for g in gaps_ms(s.token_times)]),
        "clients": "in the server's process" if args.in_process_clients else "own process",
        "wall_s": wall,
        "requests_per_s": len(samples) / wall,
        "tokens_per_s": sum(s.tokens for s in samples) / wall,
        # While the level was full: from the first request sent to the last (after that, the
        # last requests drain at falling concurrency).
        "tokens_per_s_full": tokens_per_s_full(samples),
        "ttft_after_burst": ttft_after_burst(samples, concurrency),
        "by_kind": by_kind,
        "engine": steps,
        "stalls": trace.summary(samples),
    }


def versions() -> dict:
    import grpc
    import transformers
    import triton

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "grpcio": grpc.__version__,
    }


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], sorted(SHAPES))
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="hotmerge-bench-"))
    model_dir, root = work / "model", work / "adapters"
    t = time.perf_counter()
    if not (model_dir / "config.json").exists():
        build_model(model_dir, args.shape, device)
    adapter_ids = build_adapters(model_dir, root, args.adapters, args.rank)
    print(f"built model and adapters in {time.perf_counter() - t:.1f} s under {work}", flush=True)

    config = ServerConfig(
        model=str(model_dir),
        adapter_root=root,
        data_dir=work / "data",
        host="127.0.0.1",
        port=0,
        http_port=None,
        engine=EngineConfig(
            max_batch_size=args.max_batch_size,
            max_loras=args.max_loras,
            max_lora_rank=args.rank,
            max_total_tokens=args.max_total_tokens,
            max_prefill_tokens=args.max_prefill_tokens,
            quantize=args.quantize,
            plan_ahead=args.plan_ahead,
        ),
        max_workers=max(64, 2 * max(args.concurrency)),
        merge_budget_bytes=8 * 1024**3,
        adapter_budget_bytes=16 * 1024**3,
        log_level="WARNING",
    )
    running = start_server(config)
    freeze_startup_objects()  # as `hotmerge serve` does
    prompt = prompts(1, "warm-up")[0]  # warm-up and the ties_svd phase's streams
    try:
        with HotmergeClient(running.target, timeout=600) as client:
            # Warm-up: load every adapter, compile every kernel the runs use.
            for adapter_id in adapter_ids:
                stream_once(client, prompt, 2, adapter_id=adapter_id)
            for strategy in ("TIES", "DARE_TIES", "LINEAR", "DARE_LINEAR"):
                stream_once(
                    client,
                    prompt,
                    2,
                    merged_adapters={
                        "ids": adapter_ids[:3],
                        "weights": [0.1, 0.2, 0.3],
                        "merge_strategy": strategy,
                        "density": 0.5,
                        "seed": 99,
                    },
                )
            print("warm", flush=True)
            hit = hit_overhead_us(running, adapter_ids, args.hit_reps)
            print("hit overhead", hit, flush=True)
            cold = cold_ties_share(client, adapter_ids, args.cold_runs)
            print("cold ties", cold, flush=True)
            merge_profile = None
            if args.merge_profile_runs > 0:
                table = args.out_dir / f"merge_path_profile{args.tag}.txt"
                args.out_dir.mkdir(parents=True, exist_ok=True)
                merge_profile = merge_path_profile(
                    running, adapter_ids, args.merge_profile_runs, table
                )
                print("merge path", {k: v for k, v in merge_profile.items()
                                     if k.endswith("p50")}, flush=True)  # fmt: skip
            prefix = None
            if args.prefix_runs > 0:
                prefix = shared_prefix_ttft(
                    running, client, adapter_ids[0], args.prefix_runs, args.prefix_tokens
                )
                print("shared prefix", prefix, flush=True)
            loads = []
            worker = running.engine._worker
            modes = [True, False] if args.plan_ahead_ab else [worker.plan_ahead]
            for phase, concurrency in enumerate(args.concurrency):
                for i, ahead in enumerate(modes):  # own prompts: no prefix hits across runs
                    worker.plan_ahead = ahead
                    load = load_mix(running, adapter_ids, args, concurrency, phase + 100 * i)
                    load["plan_ahead"] = ahead
                    loads.append(load)
                    ttft = {k: round(v["ttft_ms_p50"], 1) for k, v in load["by_kind"].items()}
                    print(f"load c={concurrency}{'' if ahead else ' waiting first'}: "
                          f"{load['tokens_per_s']:.0f} tokens/s "
                          f"({load['tokens_per_s_full']:.0f} while full), TTFT p50 "
                          f"by class {ttft}, ITL {load['itl']}", flush=True)  # fmt: skip
            worker.plan_ahead = modes[0]
            merge_itl = None
            if args.merge_streams > 0:
                merge_itl = merge_during_streams(running, prompt, adapter_ids, args)
                print("merge during streams", merge_itl, flush=True)
    finally:
        running.stop(0)

    result = {
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else platform.processor() or "cpu",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "model": f"random Llama, shape {args.shape} ({SHAPES[args.shape] or 'embedded tiny'}), "
        f"{'bf16' if device == 'cuda' else 'fp32'}"
        + (f", linear weights {args.quantize}" if args.quantize else "")
        + ("" if args.plan_ahead else ", no step planned ahead")
        + f", GIL switch interval {sys.getswitchinterval() * 1000:g} ms",
        "adapters": args.adapters,
        "rank": args.rank,
        "prompt_tokens": PROMPT_TOKENS,
        "hit_overhead": hit,
        "cold_ties": cold,
        "shared_prefix": prefix,
        "merge_path_profile": merge_profile,
        "loads": loads,
        "merge_during_streams": merge_itl,
        "tag": args.tag,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_results(result, args.out_dir)


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
