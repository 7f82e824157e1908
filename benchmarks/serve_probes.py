"""The probes of ``serve_load.py`` beside the load: a merge-cache hit's server-side cost, a cold
merge's share of time to first token, where a cold merge's time goes (a profile), a shared
prefix's time to first token, and running streams' inter-token latency while a ``ties_svd``
merge is computed."""

from __future__ import annotations

import math
import multiprocessing
import random
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

from hotmerge.v1 import hotmerge_pb2 as pb
from serve_clients import (
    RAMP_TOKENS,
    Sample,
    merge_during_streams_clients,
    prompts,
    stream_once,
)
from serve_report import itl_summary, pct, split_gaps
from serve_trace import DeviceTimeline, StallTrace
from torch.profiler import ProfilerActivity, profile


def hit_overhead_us(running, adapter_ids: list[str], reps: int) -> dict:
    """Server-side cost of resolving a cached merge spec vs a named adapter (median, µs)."""
    service = running.service
    merger, store = service.merger, running.store
    msg = pb.MergedAdapters(
        ids=adapter_ids[:3],
        weights=[0.5, 0.3, 0.2],
        merge_strategy=pb.TIES,
        density=0.5,
    )

    def merge_hit():  # what the service does for a merge-spec request, up to the engine
        spec = service.path.parse_spec(msg)
        merger.acquire(spec)[0].release()

    merge_hit()  # merged and cached

    def timed(fn) -> float:
        samples = []
        for _ in range(reps):
            t = time.perf_counter_ns()
            fn()
            samples.append(time.perf_counter_ns() - t)
        return statistics.median(samples) / 1000

    def named():
        store.acquire(adapter_ids[0])
        store.release(adapter_ids[0])

    named_us = timed(named)
    hit_us = timed(merge_hit)
    return {"named_adapter_us": named_us, "merge_hit_us": hit_us, "hit_adds_us": hit_us - named_us}


def cold_ties_share(client, adapter_ids: list[str], runs: int) -> dict:
    """Fresh TIES specs of 3 adapters, one at a time: merge time over TTFT, and the TTFT of a
    named adapter; every request with a prompt of its own (none finds its KV cached)."""
    texts = prompts(2 * runs, "cold")
    named = [stream_once(client, texts[i], 1, adapter_id=adapter_ids[0]) for i in range(runs)]
    cold = []
    for i in range(runs):
        spec = {
            "ids": adapter_ids[:3],
            "weights": [1.0, 0.5 + i * 1e-3, 0.25],
            "merge_strategy": "TIES",
            "density": 0.5,
        }
        cold.append(stream_once(client, texts[runs + i], 1, merged_adapters=spec))
    assert all(s.kind == "merge_miss" for s in cold)
    return {
        "named_ttft_ms_p50": pct([s.ttft_ms for s in named], 50),
        "cold_ties_ttft_ms_p50": pct([s.ttft_ms for s in cold], 50),
        "cold_ties_merge_ms_p50": pct([s.merge_ms for s in cold], 50),
        "cold_ties_merge_share_of_ttft_p50": pct([s.merge_ms / s.ttft_ms for s in cold], 50),
    }


def merge_path_profile(running, adapter_ids: list[str], runs: int, table_path) -> dict:
    """Fresh TIES specs of 3 adapters resolved by the server's merger on this thread (no RPC,
    an idle engine), as a merge-spec request's worker does: the wall time of each, the part the
    merge cache timed as the merge itself, and torch's profile of them all (host ops, syncs,
    allocations), its table written to ``table_path``."""
    service = running.service

    def spec(i: int):
        return service.path.parse_spec(
            pb.MergedAdapters(
                ids=adapter_ids[:3],
                weights=[1.0, 0.25 + i * 1e-3, 0.5],
                merge_strategy=pb.TIES,
                density=0.5,
            )
        )

    walls, merges = [], []
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with profile(activities=activities) as prof:
        for i in range(runs):
            t = time.perf_counter()
            lease, outcome = service.merger.acquire(spec(i))
            walls.append((time.perf_counter() - t) * 1000)
            merges.append(outcome.merge_ms)
            assert not outcome.cache_hit
            lease.release()
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=45)
    table_path.write_text(table + "\n")
    return {
        "runs": runs,
        "acquire_ms": walls,
        "merge_ms": merges,
        "acquire_ms_p50": pct(walls, 50),
        "merge_ms_p50": pct(merges, 50),
        "table": str(table_path),
    }


def shared_prefix_ttft(running, client, adapter_id: str, runs: int, prefix_tokens: int) -> dict:
    """TTFT of prompts that share a ``prefix_tokens`` prefix (cached after the first) against
    prompts of the same length that share nothing, one request at a time. The byte tokenizer
    makes a character a token. Each request is one step (one new token): on CUDA its device
    time and the engine thread's time for it tell the prefill's work from the rest."""
    rng = random.Random(2)

    def text(n: int) -> str:
        return "".join(rng.choice("abcdefghij ") for _ in range(n))

    def side(make_prompt) -> tuple[list[Sample], dict]:
        with (trace := engine_trace(running)):
            samples = [
                stream_once(client, make_prompt(), 1, adapter_id=adapter_id) for _ in range(runs)
            ]
        # A one-token request is two of the engine's steps (planned ahead, the second only
        # takes the first's token): its time is their sum.
        device = trace.timeline.device_ms() if trace.timeline is not None else []
        return samples, {
            "engine_ms_per_request": 1000 * sum(trace.step_seconds) / runs,
            "engine_cpu_ms_per_request": 1000 * sum(c for _, _, c in trace.steps) / runs,
            "device_ms_per_request": sum(device) / runs if device else None,
        }

    suffix = 16
    uncached, uncached_steps = side(lambda: text(prefix_tokens + suffix))
    prefix = text(prefix_tokens)
    stream_once(client, prefix + text(suffix), 1, adapter_id=adapter_id)  # fills the cache
    cached, cached_steps = side(lambda: prefix + text(suffix))
    uncached_p50 = pct([s.ttft_ms for s in uncached], 50)
    cached_p50 = pct([s.ttft_ms for s in cached], 50)
    return {
        "prefix_tokens": prefix_tokens,
        "suffix_tokens": suffix,
        "runs": runs,
        "uncached_ttft_ms_p50": uncached_p50,
        "cached_ttft_ms_p50": cached_p50,
        "ratio": cached_p50 / uncached_p50,
        # the server's split of each side's TTFT (queue: submit to prefill start)
        "uncached_queue_ms_p50": pct([s.queue_ms for s in uncached], 50),
        "uncached_prefill_ms_p50": pct([s.prefill_ms for s in uncached], 50),
        "cached_queue_ms_p50": pct([s.queue_ms for s in cached], 50),
        "cached_prefill_ms_p50": pct([s.prefill_ms for s in cached], 50),
        # the engine's steps a request: wall and CPU time on its thread, span on the device
        "uncached_steps": uncached_steps,
        "cached_steps": cached_steps,
    }


def engine_trace(running) -> StallTrace:
    """The engine thread's steps (wall and CPU time) and, on CUDA, their device spans."""
    cuda = running.engine.runner.device.type == "cuda"
    return StallTrace(running.engine._worker, None, DeviceTimeline() if cuda else None)


def step_split(trace: StallTrace, since: float = -math.inf, until: float = math.inf) -> dict:
    """The steps begun between ``since`` and ``until``: wall and CPU ms on the engine thread,
    ms on the device (None without one), p50 and p99. Wall far above both is the thread waiting
    (for the GIL); a longer device time is the device shared."""
    steps = [(1000 * s, 1000 * c) for t, s, c in trace.steps if since <= t < until]
    timeline = trace.timeline
    device = timeline.device_ms(since, until) if timeline is not None else []
    split = {"steps": len(steps)}
    for q in (50, 99):
        split[f"step_ms_p{q}"] = pct([s for s, _ in steps], q)
        split[f"step_cpu_ms_p{q}"] = pct([c for _, c in steps], q)
        split[f"step_device_ms_p{q}"] = pct(device, q) if device else None
    return split


def merge_during_streams(running, prompt: str, adapter_ids: list[str], args) -> dict:
    """Inter-token latency of running streams while a ``ties_svd`` merge is computed, against
    the same streams' latency outside the merge; and the engine's steps in and after it."""
    clients = (running.target, prompt, adapter_ids, args.merge_streams, args.merge_tokens)
    with (trace := engine_trace(running)):
        if args.in_process_clients:
            rows, start, end, merge_ms = merge_during_streams_clients(*clients)
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(1, mp_context=context) as pool:
                rows, start, end, merge_ms = pool.submit(
                    merge_during_streams_clients, *clients
                ).result()
    samples = [Sample(*x) for x in rows]
    during, without = split_gaps([s.token_times for s in samples], start, end, RAMP_TOKENS)
    during_s, without_s = itl_summary(during), itl_summary(without)
    return {
        "strategy": "ties_svd",
        "streams": args.merge_streams,
        "merge_wall_ms": (end - start) * 1000,
        "merge_ms": merge_ms,
        "during": during_s,
        "without": without_s,
        "p99_ratio": during_s["itl_ms_p99"] / without_s["itl_ms_p99"],
        "steps_during": step_split(trace, start, end),
        "steps_after": step_split(trace, end),
    }
