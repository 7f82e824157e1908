"""Decode-step benchmark: the engine's step against the memory floor, on one GPU, in one run.

1. The device copy bandwidth (a 1 GiB bf16 copy), the yardstick of every floor below.
2. A random-weight model of the chosen shape (7B Mistral sizes by default, bf16, built on the
   device from a config) and rank-16 adapters on all seven projections.
3. The old path for comparison: transformers' eager forward with a DynamicCache of the same
   context, one token per row, no LoRA.
4. The engine's decode at each batch size for no adapter, one adapter for every row and a
   distinct adapter per row: ``graph_ms`` (replay alone, back to back), ``step_ms`` (what a
   step costs the engine: filling the batch buffers, replay, greedy sampling, the host sync),
   and ``floor_ms`` = (weights + adapters used + KV actually read) / copy bandwidth.
5. With adapters, each projection group's LoRA shrink and expand at the step's shapes (layer 0's
   pool, the batch's slots, L2 flushed: ``lora_kernels.py``'s timing and byte count): µs, GB/s
   and the fraction of the copy bandwidth above.

With ``--quantize fp8,int8,nf4,int4``: the engine's decode for the bf16 base and then each
quantized base (a fresh model each), batches 1, 32, 64 by default, no adapter and distinct
adapters, each with its own floor (its packed weights and scales + adapters + KV); then each
format's linear kernel alone at the model's projection shapes against bf16 ``F.linear``.
``fp8:scaled_mm`` runs fp8 through ``torch._scaled_mm`` (W8A8) instead of the weight-only kernel.

JSON rows with ``batch``, ``adapters`` ("none"|"one"|"distinct"), ``step_ms``, ``floor_ms``
(and ``lora_kernels``; ``base`` with --quantize) go to
benchmarks/results/decode_step-<device>-<date>.json (or --out, or $OUT with --out-dir).

    python benchmarks/decode_step.py                    # 7B shapes, needs a GPU
    python benchmarks/decode_step.py --shape tiny --batches 1 4   # a quick run anywhere
    python benchmarks/decode_step.py --quantize fp8,int8,nf4,int4 --no-eager --out-dir $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import triton
from hotmerge.embedded import ALL_PROJ, byte_level_tokenizer
from hotmerge.engine import EngineConfig
from hotmerge.engine.batch import DecodeRow
from hotmerge.engine.loader import build_runner
from hotmerge.engine.sampling import RowSampling
from hotmerge.generation import SamplingParams
from hotmerge_kernels import backend
from hotmerge_kernels.layout import FlatAdapter
from hotmerge_kernels.ops.lora import LoraKernelMeta, lora_expand, lora_shrink, lora_workspace
from hotmerge_kernels.quant import QuantizedWeight
from lora_kernels import bench, bytes_moved
from quant_kernels import quant_kernel_rows

SHAPES = {
    "7b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
    "tiny": dict(
        hidden_size=256,
        intermediate_size=768,  # whole int4 groups (128) for --quantize
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=259,
    ),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, iters: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` (synchronised each call)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a device-to-device copy of 1 GiB (read + write counted)."""
    src = torch.empty(2**29, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), device, 20)
    return 2 * src.numel() * 2 / (ms / 1000)


def build_model(shape: str, device: torch.device, max_positions: int):
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(
        **SHAPES[shape], max_position_embeddings=max_positions, sliding_window=None
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def random_adapter(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> FlatAdapter:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, (fan_in, fan_out) in shapes.items():
        if path.rsplit(".", 1)[1] in ALL_PROJ:
            tensors[(path, "A")] = torch.randn(rank, fan_in, generator=gen) * 0.01
            tensors[(path, "B")] = torch.randn(fan_out, rank, generator=gen) * 0.01
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return FlatAdapter.from_tensors(
        tensors, rank=rank, scaling=2.0, dtype=torch.bfloat16, device=device
    )


def eager_step_ms(model, batch: int, context: int, device, iters: int) -> float:
    """transformers' eager forward, one new token per row over a ``context``-token cache."""
    from transformers import DynamicCache

    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    cache = DynamicCache(config=config)
    for layer in range(config.num_hidden_layers):
        kv = torch.randn(batch, kv_heads, context, head_dim, dtype=torch.bfloat16, device=device)
        cache.update(kv, kv.clone(), layer)
    ids = torch.randint(0, config.vocab_size, (batch, 1), device=device)
    pos = torch.full((batch, 1), context, device=device)

    def step():
        with torch.inference_mode():
            model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True)
        for layer in cache.layers:  # drop the new token: every step sees the same context
            layer.keys = layer.keys[:, :, :context]
            layer.values = layer.values[:, :, :context]

    return timed(step, device, iters)


def weight_bytes(runner) -> int:
    """Bytes a decode step reads of the model's weights (the embedding: one row per token);
    a quantized projection: its packed codes and scales."""
    total = 0
    for name, p in runner.model.named_parameters():
        if "embed" not in name:
            total += p.numel() * p.element_size()
    for layer in runner.model.layers:  # quantized weights are held as attributes
        for w in (layer.qkv_weight, layer.o_weight, layer.gate_up_weight, layer.down_weight):
            if isinstance(w, QuantizedWeight):
                total += w.nbytes
    return total


def lora_kernel_rows(pool, slots: torch.Tensor, rank: int, bandwidth: float) -> list[dict]:
    """Each group's shrink and expand on layer 0's pool for these token slots: µs and the
    achieved bandwidth, also as a fraction of the copy's."""
    t, device = slots.shape[0], slots.device
    meta = LoraKernelMeta(t, pool.num_slots, device)
    meta.update(slots)
    rows = []
    for group, lora_a in pool.a.items():
        a, b, ranks, offsets = lora_a[0], pool.b[group][0], pool.ranks[group], pool.offsets[group]
        n_in, ns = a.shape[-1], a.shape[1]
        x = torch.randn(t, n_in, device=device).to(a.dtype)
        y = torch.randn(t, offsets[-1], device=device).to(b.dtype)
        buf = lora_workspace([n_in], ns, t, pool.max_rank, device)
        us = {
            "shrink": bench(lambda: lora_shrink(x, a, ranks, slots, buf, meta)),  # noqa: B023
            "expand": bench(lambda: lora_expand(buf, b, ranks, slots, y, offsets, meta)),  # noqa: B023
        }
        widths = [hi - lo for lo, hi in itertools.pairwise(offsets)]
        moved = dict(zip(us, bytes_moved(n_in, widths, rank, slots, a.element_size()), strict=True))
        for kernel, time_us in us.items():
            gbps = moved[kernel] / time_us / 1e3
            rows.append(dict(group=group, kernel=kernel, us=time_us, bytes=moved[kernel],
                             gbps=gbps, of_copy=gbps * 1e9 / bandwidth))  # fmt: skip
    line = " | ".join(f"{r['group']} {r['kernel']} {r['us']:.1f} us {100 * r['of_copy']:.0f}%"
                      for r in rows)  # fmt: skip
    print(f"  LoRA kernels (% of copy): {line}")
    return rows


def engine_rows(runner, args, device, bandwidth: float, modes, label: str) -> list[dict]:
    """The engine's decode at each batch size and adapter mode, against its own floor."""
    max_batch = max(args.batches)
    shapes = runner.module_shapes()
    adapters = [random_adapter(shapes, args.rank, seed) for seed in range(max_batch)]
    slots = list(range(len(adapters)))  # one slot per adapter
    for slot, adapter in zip(slots, adapters, strict=True):
        runner.adapters.write(slot, adapter)
    adapter_bytes = adapters[0].nbytes
    weights = weight_bytes(runner)
    cfg = runner.model.config
    kv_token_bytes = (
        2 * cfg.num_hidden_layers * runner.model.num_kv_heads * runner.model.head_dim * 2
    )
    blocks_per_row = -(-(args.context + 1) // runner.block_size)
    greedy = SamplingParams(max_new_tokens=1)
    rows_out = []
    for batch in args.batches:
        for mode in modes:
            rows = []
            for i in range(batch):
                table = list(range(1 + i * blocks_per_row, 1 + (i + 1) * blocks_per_row))
                slot = {"none": -1, "one": slots[0], "distinct": slots[i]}[mode]
                rows.append(DecodeRow(i, 7 + i, args.context, table, slot))
            sampling = [RowSampling(greedy, 0, 0) for _ in rows]

            def step(rows=rows, sampling=sampling):
                logits = runner.decode(rows)
                runner.sample([logits], sampling).wait()

            step_ms = timed(step, device, args.iters)
            graph_ms = None
            if device.type == "cuda" and runner._graphs:
                size = next(s for s in runner.sizes if s >= batch)
                runner.decode(rows)
                graph = runner._graphs[size, mode != "none"][0]
                start, end = torch.cuda.Event(True), torch.cuda.Event(True)
                graph.replay()
                start.record()
                for _ in range(args.iters):
                    graph.replay()
                end.record()
                sync(device)
                graph_ms = start.elapsed_time(end) / args.iters
            used = {"none": 0, "one": 1, "distinct": batch}[mode]
            floor_bytes = (
                weights + used * adapter_bytes + batch * (args.context + 1) * kv_token_bytes
            )
            floor_ms = floor_bytes / bandwidth * 1000
            row = dict(path="engine", base=label, batch=batch, adapters=mode, step_ms=step_ms,
                       graph_ms=graph_ms, floor_ms=floor_ms, weight_bytes=weights,
                       step_over_floor=step_ms / floor_ms,
                       tokens_per_s=batch / step_ms * 1000)  # fmt: skip
            rows_out.append(row)
            print(
                f"engine {label:14s} batch {batch:3d} {mode:8s}: step {step_ms:7.2f} ms, graph "
                f"{graph_ms if graph_ms is None else round(graph_ms, 2)} ms, floor "
                f"{floor_ms:6.2f} ms ({step_ms / floor_ms:.2f}x), "
                f"{batch / step_ms * 1000:7.0f} tok/s"
            )
            if mode != "none" and device.type == "cuda" and args.lora_kernels:
                slots_t = torch.tensor([r.slot for r in rows], dtype=torch.int32, device=device)
                kernels = lora_kernel_rows(runner.adapters, slots_t, args.rank, bandwidth)
                row["lora_kernels"] = kernels
    return rows_out


def quant_summary(rows: list[dict]) -> None:
    """Each quantized base's step against bf16's at the same batch and adapters."""
    bf16 = {(r["batch"], r["adapters"]): r["step_ms"] for r in rows if r.get("base") == "bf16"}
    print("\nbase            batch adapters   step ms  floor ms  x floor  x bf16")
    for r in rows:
        if r.get("path") != "engine" or "base" not in r:
            continue
        ref = bf16.get((r["batch"], r["adapters"]))
        r["step_over_bf16"] = r["step_ms"] / ref if ref else None
        print(
            f"{r['base']:14s}  {r['batch']:5d} {r['adapters']:9s} {r['step_ms']:8.2f} "
            f"{r['floor_ms']:9.2f} {r['step_over_floor']:8.2f} "
            f"{r['step_over_bf16'] or float('nan'):7.2f}"
        )


def quantized_bases(args, device, bandwidth: float, config: EngineConfig) -> list[dict]:
    """bf16 then each format: a fresh model per base (quantizing releases the 16-bit weights).
    With ``--bf16-from``, bf16's rows come from that earlier run's JSON (same card and lease:
    formats measured in processes of their own against one baseline)."""
    rows, labels = [], ["bf16", *args.quantize.split(",")]
    if args.bf16_from:
        saved = json.loads(args.bf16_from.read_text())["rows"]
        rows = [r for r in saved if r.get("path") == "engine" and r.get("base") == "bf16"]
        labels = labels[1:]
    for label in labels:
        fmt, _, matmul = label.partition(":")
        backend.FP8_MATMUL = matmul or "weight_only"
        model = build_model(args.shape, device, max_positions=max(4096, args.context + 64))
        quantize = None if fmt == "bf16" else fmt
        base_config = dataclasses.replace(config, quantize=quantize)
        runner = build_runner("bench", model, byte_level_tokenizer(), base_config)
        del model
        rows += engine_rows(runner, args, device, bandwidth, ("none", "distinct"), label)
        del runner
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    backend.FP8_MATMUL = "weight_only"
    quant_summary(rows)
    if device.type == "cuda":
        rows += quant_kernel_rows(args.quantize.split(","), SHAPES[args.shape], bandwidth)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--batches", type=int, nargs="+", help="(default: 1 16 32 64; "
                        "with --quantize 1 32 64)")  # fmt: skip
    parser.add_argument("--context", type=int, default=512, help="tokens in each row's cache")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-lora-rank", type=int, help="the pool's width (default: --rank)")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--no-eager", action="store_true", help="skip the transformers path")
    parser.add_argument("--quantize", help="comma-separated bases to compare with bf16: fp8, "
                        "int8, nf4, int4, fp8:scaled_mm")  # fmt: skip
    parser.add_argument("--bf16-from", type=Path, help="with --quantize: bf16's rows from this "
                        "earlier JSON instead of measuring them again")  # fmt: skip
    parser.add_argument("--out", type=Path)
    parser.add_argument("--out-dir", type=Path, help="write the JSON here (default: $OUT if set)")
    args = parser.parse_args()
    args.batches = args.batches or ([1, 32, 64] if args.quantize else [1, 16, 32, 64])
    args.lora_kernels = not args.quantize

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    max_batch = max(args.batches)
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth: {bandwidth / 1e12:.3f} TB/s")
    config = EngineConfig(
        max_batch_size=max_batch,
        max_total_tokens=args.context + 64,
        kv_cache_tokens=max_batch * (args.context + 64),
        max_loras=max_batch,
        max_lora_rank=args.max_lora_rank or args.rank,
        cuda_graphs=device.type == "cuda",
    )
    rows_out = []
    if args.quantize:
        rows_out += quantized_bases(args, device, bandwidth, config)
        weights = adapter_bytes = None  # per base, in the rows
    else:
        model = build_model(args.shape, device, max_positions=max(4096, args.context + 64))
        if not args.no_eager:
            for batch in args.batches:
                ms = eager_step_ms(model, batch, args.context, device, max(5, args.iters // 3))
                rows_out.append(dict(path="transformers-eager", batch=batch, adapters="none",
                                     step_ms=ms))  # fmt: skip
                print(f"transformers eager   batch {batch:3d}: {ms:8.2f} ms")
        runner = build_runner("bench", model, byte_level_tokenizer(), config)
        del model
        weights = weight_bytes(runner)
        adapter_bytes = random_adapter(runner.module_shapes(), args.rank, 0).nbytes
        rows_out += engine_rows(
            runner, args, device, bandwidth, ("none", "one", "distinct"), "bf16"
        )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = dict(
        benchmark="decode_step",
        device=name,
        date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        versions=dict(
            torch=torch.__version__,
            triton=triton.__version__,
            python=platform.python_version(),
            cuda=torch.version.cuda,
        ),  # fmt: skip
        shape=args.shape,
        quantize=args.quantize,
        context=args.context,
        rank=args.rank,
        max_lora_rank=args.max_lora_rank or args.rank,
        copy_bandwidth_tb_s=bandwidth / 1e12,
        weight_bytes=weights,
        adapter_bytes=adapter_bytes,
        rows=rows_out,
    )
    out_dir = args.out_dir or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    file = f"decode_step-{name.replace(' ', '_')}-{dt.date.today()}.json"
    out = args.out or (out_dir or Path(__file__).parent / "results") / file
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
