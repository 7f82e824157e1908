"""Host cost of writing an adapter into an adapter-pool slot at a 7B Llama's geometry (32 layers,
7 projections: 224 modules), the work admission does on the engine thread for each adapter or
merge it brings in. On CUDA the copies only launch here (host time is the call's time); on the
CPU they also run, so use ``--dim`` small there to see the host's share.

With ``--busy-ms`` (CUDA), each write is made while that much device work is queued ahead of it,
as serving's writes run while a step is in flight, for several kinds of adapter: one in the
pool's dtype and layout, one of a new layout (a new write plan), float32, and a TIES merge of
three. A write that waits for the device takes about the busy time; torch's synchronizing calls
during the writes are printed with the line of hotmerge that made them.

python benchmarks/slot_write_cost.py [--dim 64] [--rank 16] [--reps 30] [--busy-ms 50]
"""

from __future__ import annotations

import argparse
import time
import traceback
import warnings

import torch
from hotmerge.engine.lora import AdapterPool
from hotmerge_kernels.layout import FlatAdapter
from hotmerge_kernels.merge import merge_adapters
from hotmerge_kernels.merge.params import MergeParams, Strategy

LAYERS = 32


def geometry(dim: int) -> tuple[dict, dict]:
    """A 7B Llama's LoRA groups scaled to ``dim`` (4096: the real one), and the module paths."""
    kv, ffn = dim // 4, dim * 7 // 2
    shapes = {
        "qkv": {"q_proj": (dim, dim), "k_proj": (dim, kv), "v_proj": (dim, kv)},
        "o": {"o_proj": (dim, dim)},
        "gate_up": {"gate_proj": (dim, ffn), "up_proj": (dim, ffn)},
        "down": {"down_proj": (ffn, dim)},
    }
    paths = {}
    for layer in range(LAYERS):
        for group, modules in shapes.items():
            parent = "self_attn" if group in ("qkv", "o") else "mlp"
            for name in modules:
                paths[f"model.layers.{layer}.{parent}.{name}"] = (group, name, layer)
    return shapes, paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=4096 if torch.cuda.is_available() else 64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--busy-ms", type=float, help="(CUDA) write while this much work runs")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes, paths = geometry(args.dim)
    pool = AdapterPool(shapes, paths, num_layers=LAYERS, num_slots=4, max_rank=args.rank,
                       dtype=torch.bfloat16, device=device)  # fmt: skip
    tensors = random_tensors(shapes, paths, args.rank, device)
    if args.busy_ms:
        stalls(pool, shapes, paths, args.rank, args.busy_ms)
        return
    adapters = [
        FlatAdapter.from_tensors(tensors, rank=args.rank, scaling=2.0, dtype=torch.bfloat16)
        for _ in range(args.reps + 1)
    ]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    pool.write(0, adapters[0])  # the first write of a layout: its views are made
    first = time.perf_counter() - start
    sync()
    host = []
    for slot, adapter in enumerate(adapters[1:]):  # every adapter new to the pool, as merges are
        start = time.perf_counter()
        pool.write(slot % pool.num_slots, adapter)
        host.append(time.perf_counter() - start)
        sync()
    host.sort()
    print(f"{device.type}, dim {args.dim}, rank {args.rank}, {len(paths)} modules: first write "
          f"{first * 1e3:.2f} ms, then a new adapter's write {host[len(host) // 2] * 1e3:.2f} ms "
          f"host (median of {len(host)})")  # fmt: skip


def random_tensors(shapes, paths, rank: int, device) -> dict:
    tensors = {}
    for path, (group, name, _) in paths.items():
        fan_in, fan_out = shapes[group][name]
        tensors[(path, "A")] = torch.randn(rank, fan_in, device=device) * 0.02
        tensors[(path, "B")] = torch.randn(fan_out, rank, device=device) * 0.02
    return tensors


def stalls(pool: AdapterPool, shapes, paths, rank: int, busy_ms: float) -> None:
    """Host wall and CPU time of writes made behind ``busy_ms`` of queued device work."""
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    x @ x  # cuBLAS set up outside the timing
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        x @ x
    torch.cuda.synchronize()
    per_matmul_ms = (time.perf_counter() - start) * 100

    def busy() -> None:
        for _ in range(max(1, round(busy_ms / per_matmul_ms))):
            x @ x

    def flat(r: int, dtype) -> FlatAdapter:
        return FlatAdapter.from_tensors(
            random_tensors(shapes, paths, r, "cuda"), rank=r, scaling=2.0, dtype=dtype
        )

    inputs = [flat(rank, torch.bfloat16) for _ in range(3)]
    params = MergeParams(Strategy.TIES, (1.0, 1.0, 0.5), density=0.5)
    kinds = {  # each made for its repetition ``rep``
        "bf16, known layout": lambda rep: flat(rank, torch.bfloat16),
        "bf16, new layout": lambda rep: flat(rank // 2 + rep, torch.bfloat16),  # a rank unseen
        "float32": lambda rep: flat(rank, torch.float32),
        "TIES merge of 3": lambda rep: merge_adapters(inputs, params).adapter,
    }
    pool.write(0, inputs[0])  # the known layout's plan
    torch.cuda.synchronize()
    syncs: list[str] = []

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        ours = [f for f in traceback.extract_stack() if "hotmerge" in f.filename]
        where = f"{ours[-1].filename.split('/')[-1]}:{ours[-1].lineno}" if ours else "?"
        syncs.append(f"{where}: {message}")

    for kind, make in kinds.items():
        for rep in range(3):
            adapter = make(rep)
            torch.cuda.synchronize()
            busy()
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = show
                wall, cpu = time.perf_counter(), time.thread_time()
                pool.write(1 + rep % (pool.num_slots - 1), adapter)
                wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
            print(f"{kind:20} write behind {busy_ms:.0f} ms of device work: "
                  f"{wall * 1e3:7.2f} ms wall, {cpu * 1e3:7.2f} ms CPU; syncs: "
                  f"{syncs or 'none'}", flush=True)  # fmt: skip
            syncs.clear()


if __name__ == "__main__":
    main()
