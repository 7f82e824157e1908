"""Soak: thousands of mixed requests under a small merge budget; memory must stay flat.

Starts an in-process server on the embedded default model (or ``--model`` / ``--adapter-root``)
with a merge-cache budget of a few merged adapters, then sends ``--requests`` requests from
``--concurrency`` threads: generations with a named adapter, with a random merge spec (so the
cache evicts all the time), Merge calls, streams cancelled after their first token, requests
with short deadlines, and hostile ones (bad ids, absurd weights, tiny temperatures, oversize
prompts). Every ``--sample-every`` requests it records the process RSS and, on CUDA, the device
memory allocated and reserved. Writes benchmarks/results/soak-<device>-<date>.{json,md}.

    python benchmarks/soak.py --requests 3000 --concurrency 8
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import random
import resource
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch
from hotmerge.client import HotmergeClient
from hotmerge.config import ServerConfig
from hotmerge.embedded import DEMO_ADAPTERS
from hotmerge.server import start_server

STRATEGIES = ("LINEAR", "TIES", "DARE_LINEAR", "DARE_TIES", "MAGNITUDE_PRUNE", "CAT")


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_mib() -> tuple[float | None, float | None]:
    if not torch.cuda.is_available():
        return None, None
    return torch.cuda.memory_allocated() / 2**20, torch.cuda.memory_reserved() / 2**20


def random_spec(rng: random.Random, ids: list[str]) -> dict:
    chosen = rng.sample(ids, rng.randint(2, min(3, len(ids))))
    return {
        "ids": chosen,
        "weights": [round(rng.uniform(0.1, 1.0), 1) for _ in chosen],
        "merge_strategy": rng.choice(STRATEGIES),
        "density": rng.choice((0.3, 0.5, 0.8)),
        "seed": rng.randint(0, 3),
    }


def one_request(client: HotmergeClient, rng: random.Random, ids: list[str], max_new: int) -> str:
    """One request of a random kind; returns its kind and status code name."""
    kind = rng.choices(
        ("named", "merged", "merge", "stream-cancel", "deadline", "hostile"),
        weights=(30, 30, 15, 10, 10, 5),
    )[0]
    try:
        if kind == "named":
            client.generate("hello", adapter_id=rng.choice(ids), max_new_tokens=max_new)
        elif kind == "merged":
            client.generate("hello", merged_adapters=random_spec(rng, ids), max_new_tokens=max_new)
        elif kind == "merge":
            client.merge(random_spec(rng, ids))
        elif kind == "stream-cancel":
            stream = client.generate_stream("hello", adapter_id=rng.choice(ids), max_new_tokens=64)
            next(iter(stream))
            stream.cancel()
            return f"{kind}:CANCELLED"
        elif kind == "deadline":
            client.generate(
                "hello", merged_adapters=random_spec(rng, ids), max_new_tokens=64, timeout=0.05
            )
        else:
            hostile = rng.choice(
                (
                    lambda: client.load_adapter("x" * 300),
                    lambda: client.merge({"ids": ids[:2], "weights": [3.4e38, 3.4e38]}),
                    lambda: client.generate("hi", temperature=1e-45),
                    lambda: client.generate("a" * 1_000_000),
                )
            )
            hostile()
    except grpc.RpcError as err:
        return f"{kind}:{err.code().name}"
    return f"{kind}:OK"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--sample-every", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--merge-budget-mib", type=float, default=None,
                        help="default: about three merged demo adapters")  # fmt: skip
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--model", default=None)
    parser.add_argument("--adapter-root", type=Path, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    config = ServerConfig(
        model=args.model,
        adapter_root=args.adapter_root,
        data_dir=args.data_dir,
        device=args.device,
        host="127.0.0.1",
        port=0,
        max_workers=max(16, 2 * args.concurrency),
        max_wait_s=5.0,
        log_level="WARNING",
    )
    with start_server(config) as running:
        store = running.store
        ids = [a.id for a in store.list()][:8] or [a.name for a in DEMO_ADAPTERS]
        sizes = [store.size_of(i) for i in ids]
        budget = (
            int(args.merge_budget_mib * 2**20)
            if args.merge_budget_mib is not None
            else 3 * max(sizes) + max(sizes) // 2
        )
        cache = running.service.merger.cache
        cache._lru.budget_bytes = budget  # a small merge budget: evictions all the time
        samples, counts = [], Counter()
        lock = threading.Lock()
        done = 0
        start = time.monotonic()

        def sample() -> None:
            gc.collect()
            allocated, reserved = device_mib()
            stats = cache.stats()
            samples.append(
                {
                    "requests": done,
                    "seconds": round(time.monotonic() - start, 2),
                    "rss_mib": round(rss_mib(), 1),
                    "device_allocated_mib": allocated,
                    "device_reserved_mib": reserved,
                    "merge_cache_bytes": stats.used_bytes,
                    "merge_cache_entries": stats.entries,
                    "evictions": stats.evictions,
                    "adapter_bytes": store.used_bytes,
                }
            )

        def work(i: int) -> None:
            nonlocal done
            rng = random.Random(args.seed * 1_000_003 + i)
            outcome = one_request(client, rng, ids, args.max_new_tokens)
            with lock:
                counts[outcome] += 1
                done += 1
                if done % args.sample_every == 0:
                    sample()

        with HotmergeClient(running.target, timeout=30) as client:
            sample()
            with ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(work, range(args.requests)))
            sample()
            info = client.info()
        elapsed = time.monotonic() - start

    warm = samples[len(samples) // 5]  # after warm-up: caches filled, allocator settled
    result = {
        "date": datetime.date.today().isoformat(),
        "device": info.device,
        "model": info.model_id,
        "dtype": info.dtype,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "merge_budget_bytes": budget,
        "seconds": round(elapsed, 1),
        "outcomes": dict(sorted(counts.items())),
        "rss_mib_after_warmup": warm["rss_mib"],
        "rss_mib_end": samples[-1]["rss_mib"],
        "rss_mib_max_after_warmup": max(s["rss_mib"] for s in samples[len(samples) // 5 :]),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "grpcio": grpc.__version__,
        },
        "samples": samples,
    }
    write_results(result, args.out_dir)


def write_results(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"soak-{result['device'].replace(':', '')}-{result['date']}"
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# Soak, {result['date']}: {result['requests']} requests on {result['device']} "
        f"({result['dtype']}), concurrency {result['concurrency']}",
        "",
        f"Model {result['model']}; merge budget {result['merge_budget_bytes']} bytes; "
        f"{result['seconds']} s; versions {result['versions']}.",
        "",
        f"RSS after warm-up {result['rss_mib_after_warmup']} MiB, at the end "
        f"{result['rss_mib_end']} MiB, highest after warm-up "
        f"{result['rss_mib_max_after_warmup']} MiB.",
        "",
        "Outcomes (kind:status): " + ", ".join(f"{k} {v}" for k, v in result["outcomes"].items()),
        "",
        "| requests | s | RSS MiB | device alloc MiB | device reserved MiB | merge cache bytes "
        "| entries | evictions | adapter bytes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in result["samples"]:
        lines.append(
            f"| {s['requests']} | {s['seconds']} | {s['rss_mib']} | {s['device_allocated_mib']} "
            f"| {s['device_reserved_mib']} | {s['merge_cache_bytes']} | "
            f"{s['merge_cache_entries']} | {s['evictions']} | {s['adapter_bytes']} |"
        )
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:8]))


if __name__ == "__main__":
    main()
