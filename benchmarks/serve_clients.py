"""What ``serve_load.py``'s clients run (in a process of their own, as users' clients do):
streamed requests timed per token, a load at a fixed concurrency, and streams with one
ΔW-space merge fired while they run."""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from hotmerge.client import HotmergeClient

RAMP_TOKENS = 4  # tokens each stream has before the merge starts (the batch has formed)
PROMPT_TOKENS = 128  # BOS + 127 bytes (the byte tokenizer makes a character a token)


def prompts(count: int, tag: str) -> list[str]:
    """``count`` prompts of ``PROMPT_TOKENS`` tokens, each its own: no request finds another's
    KV in the prefix cache (a fresh merge never could: its adapter is new), so named adapters
    and merges are compared on the same work. ``tag`` keeps each phase's prompts apart."""
    rng = random.Random(tag)
    return [
        "".join(rng.choice("abcdefghij ") for _ in range(PROMPT_TOKENS - 1)) for _ in range(count)
    ]


@dataclass
class Sample:
    kind: str  # single | merge_hit | merge_miss
    ttft_ms: float
    total_ms: float
    merge_ms: float
    tokens: int
    token_times: list[float]  # perf_counter (system-wide monotonic) at each token's arrival
    queue_ms: float = 0.0  # the server's timings: waiting for a batch slot, KV or adapter room
    prefill_ms: float = 0.0


def stream_once(
    client: HotmergeClient, prompt: str, max_new_tokens: int, on_token=None, **adapter
) -> Sample:
    """One streamed request; ``on_token(count)`` after each token that arrives."""
    start = time.perf_counter()
    ttft = None
    final = None
    times = []
    for msg in client.generate_stream(prompt, max_new_tokens=max_new_tokens, **adapter):
        if msg.HasField("token"):
            times.append(time.perf_counter())
            if ttft is None:
                ttft = (times[-1] - start) * 1000
            if on_token is not None:
                on_token(len(times))
        if msg.done:
            final = msg
    total = (time.perf_counter() - start) * 1000
    if "merged_adapters" in adapter:
        kind = "merge_hit" if final.merge.cache_hit else "merge_miss"
    else:
        kind = "single"
    t = final.timings
    return Sample(
        kind, ttft or total, total, t.merge_ms, final.generated_tokens, times, t.queue_ms,
        t.prefill_ms,
    )  # fmt: skip


def run_clients(
    target: str, texts: list[str], plan: list[dict], max_new_tokens: int, concurrency: int
) -> tuple[list[tuple], float]:
    """The plan's requests (prompt ``texts[i]`` for request i), ``concurrency`` at a time over
    one channel: (samples as tuples, wall s)."""
    with HotmergeClient(target, timeout=600) as client:
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            samples = list(
                pool.map(
                    lambda text, kw: stream_once(client, text, max_new_tokens, **kw), texts, plan
                )
            )
        wall = time.perf_counter() - start
    return [dataclasses.astuple(x) for x in samples], wall  # plain tuples cross processes


def ties_svd_spec(adapter_ids: list[str], tag: float) -> dict:
    """A ΔW-space merge of 3 adapters; ``tag`` makes it a fresh spec (never cached)."""
    return {
        "ids": adapter_ids[:3],
        "weights": [1.0, 0.7 + 1e-3 * tag, 0.4],
        "merge_strategy": "TIES_SVD",
        "density": 0.5,
    }


def merge_during_streams_clients(
    target: str, prompt: str, adapter_ids: list[str], streams: int, max_new_tokens: int
) -> tuple[list[tuple], float, float, float]:
    """``streams`` streams of named adapters; once each has ``RAMP_TOKENS`` tokens, one fresh
    ``ties_svd`` merge (the Merge RPC) while they run.
    (samples, merge start, merge end, server merge_ms)."""
    ready = threading.Semaphore(0)

    def on_token(count: int) -> None:
        if count == RAMP_TOKENS:
            ready.release()

    def one(i: int) -> Sample:
        adapter = adapter_ids[i % len(adapter_ids)]
        sample = stream_once(client, prompt, max_new_tokens, on_token, adapter_id=adapter)
        if len(sample.token_times) < RAMP_TOKENS:  # ended early (EOS): the merge waits no more
            ready.release()
        return sample

    with HotmergeClient(target, timeout=600) as client:
        client.merge(ties_svd_spec(adapter_ids, 0))  # warm: compile and autotune first
        with ThreadPoolExecutor(streams) as pool:
            running = [pool.submit(one, i) for i in range(streams)]
            for _ in range(streams):
                ready.acquire(timeout=600)
            start = time.perf_counter()
            reply = client.merge(ties_svd_spec(adapter_ids, 1))
            end = time.perf_counter()
            samples = [f.result() for f in running]
    assert not reply.cache_hit
    return [dataclasses.astuple(x) for x in samples], start, end, reply.merge_ms
