"""Host cost of writing an adapter into an adapter-pool slot at a 7B Llama's geometry (32 layers,
7 projections: 224 modules), the work admission does on the engine thread for each adapter or
merge it brings in. On CUDA the copies only launch here (host time is the call's time); on the
CPU they also run, so use ``--dim`` small there to see the host's share.

python benchmarks/slot_write_cost.py [--dim 64] [--rank 16] [--reps 30]
"""

from __future__ import annotations

import argparse
import time

import torch
from hotmerge.engine.lora import AdapterPool
from hotmerge_kernels.layout import FlatAdapter

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
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes, paths = geometry(args.dim)
    pool = AdapterPool(shapes, paths, num_layers=LAYERS, num_slots=4, max_rank=args.rank,
                       dtype=torch.bfloat16, device=device)  # fmt: skip
    tensors = {}
    for path, (group, name, _) in paths.items():
        fan_in, fan_out = shapes[group][name]
        tensors[(path, "A")] = torch.randn(args.rank, fan_in, device=device)
        tensors[(path, "B")] = torch.randn(fan_out, args.rank, device=device)
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


if __name__ == "__main__":
    main()
