"""The ``hotmerge`` command: ``serve`` runs a server; the other commands are its clients.

    hotmerge serve [--model PATH] [--port 50051] [--http-port 8080] [--merges FILE] ...
    hotmerge merge demo-a,demo-b --strategy ties --density 0.5 --name my-merge
    hotmerge generate --adapter demo-a "hello" [--max-new-tokens N] [--stream]
    hotmerge generate --merge demo-a,demo-b --weights 1,0.5 --strategy ties --density 0.5 "hi"
    hotmerge merge demo-a,demo-b --strategy dare_ties --density 0.5 --seed 7
    hotmerge info | adapters | merges | load ID | unload ID        [--target host:port]
    hotmerge eval --skills sql,python --adapter sql-coder  |  hotmerge sweep a,b --skills ...
    hotmerge export demo-a,demo-b --strategy ties_svd --density 0.5 --out merged/ \
        [--adapter-root DIR] [--device cuda] [--dtype bfloat16]    (offline, no server)

``generate`` writes the generated text to stdout and the finish reason and timings to stderr,
so ``hotmerge generate ... > out.txt`` keeps the text alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import grpc
from hotmerge_kernels.merge.params import Strategy

from hotmerge import __version__, settings
from hotmerge.cli_eval import add_eval_parsers
from hotmerge.client import DEFAULT_TARGET, HotmergeClient, merge_request
from hotmerge.config import ServerConfig
from hotmerge.engine.config import QUANT_FORMATS, EngineConfig
from hotmerge.errors import HotmergeError
from hotmerge.merging.spec import is_identity, parse_merge_spec
from hotmerge.v1 import hotmerge_pb2 as pb

# The serve command's options: the server's config fields, and its engine's (--max-batch-size...).
_ENGINE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
_DEFAULTS = {
    **{f.name: f.default for f in dataclasses.fields(ServerConfig) if f.name != "engine"},
    **_ENGINE_DEFAULTS,
}


# -- output -----------------------------------------------------------------------------------


def printable(text: str) -> str:
    """Text safe for a terminal: control characters (but newline and tab) become escapes."""
    out = []
    for ch in text:
        if ch in "\n\t" or not unicodedata.category(ch).startswith("C"):
            out.append(ch)
        else:
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
    return "".join(out)


def format_timings(finish_reason: int, tokens: int, t: pb.Timings) -> str:
    reason = pb.FinishReason.Name(finish_reason).lower()
    return (
        f"[{tokens} tokens, finish {reason}] queue {t.queue_ms:.1f} ms | "
        f"adapter load {t.adapter_load_ms:.1f} ms | merge {t.merge_ms:.1f} ms | "
        f"prefill {t.prefill_ms:.1f} ms | decode {t.decode_ms:.1f} ms | total {t.total_ms:.1f} ms"
    )


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(header)] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


# -- commands ---------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from hotmerge.server import serve

    options = {
        name: getattr(args, name) for name in _DEFAULTS if getattr(args, name, None) is not None
    }
    if args.merges is not None:
        options["merges_file"] = args.merges
    if options.get("http_port") == -1:
        options["http_port"] = None
    if args.adapter_budget_mib is not None:
        options["adapter_budget_bytes"] = int(args.adapter_budget_mib * 2**20)
    if args.merge_budget_mib is not None:
        options["merge_budget_bytes"] = int(args.merge_budget_mib * 2**20)
    engine = {name: options.pop(name) for name in _ENGINE_DEFAULTS if name in options}
    try:
        config = ServerConfig(**options, engine=EngineConfig(**engine))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        serve(config)
    except (OSError, HotmergeError) as exc:  # port in use, no such model, bad dtype...
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _merge_spec(args: argparse.Namespace) -> dict | None:
    """The --merge options as the fields of a MergedAdapters message (None without --merge)."""
    if not args.merge:
        return None
    spec = {
        "ids": [i.strip() for i in args.merge.split(",") if i.strip()],
        "merge_strategy": args.strategy.upper(),
        "majority_sign_method": args.sign_method.upper(),
        "seed": args.merge_seed,
    }
    if args.weights:
        spec["weights"] = [float(w) for w in args.weights.split(",")]
    if args.density is not None:
        spec["density"] = args.density
    if args.svd_rank is not None:
        spec["svd_rank"] = args.svd_rank
    if args.svd_clamp is not None:
        spec["svd_clamp"] = args.svd_clamp
    return spec


def _generation_options(args: argparse.Namespace) -> dict:
    merged = _merge_spec(args)
    if merged is not None and args.adapter:
        raise ValueError("give --adapter or --merge, not both")
    return dict(
        adapter_id=args.adapter,
        merged_adapters=merged,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        do_sample=args.do_sample or None,
        seed=args.seed,
        repetition_penalty=args.repetition_penalty,
        stop=args.stop,
        details=args.details or None,
    )


def format_merge(merge: pb.MergeInfo) -> str:
    return f"[merge {merge.merge_key}, {'cache hit' if merge.cache_hit else 'merged'}]"


def cmd_generate(args: argparse.Namespace, client: HotmergeClient) -> int:
    try:
        options = _generation_options(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.stream:
        reply = client.generate(args.prompt, **options)
        print(printable(reply.generated_text))
        for tok in reply.tokens:
            print(f"  {tok.id:>6}  {tok.logprob:9.4f}  {tok.text!r}", file=sys.stderr)
        summary = format_timings(reply.finish_reason, reply.generated_tokens, reply.timings)
        if reply.HasField("merge"):
            summary += " " + format_merge(reply.merge)
        print(summary, file=sys.stderr)
        return 0
    call = client.generate_stream(args.prompt, **options)
    try:
        for msg in call:
            if not msg.done:
                print(printable(msg.text), end="", flush=True)
                continue
            print()
            summary = format_timings(msg.finish_reason, msg.generated_tokens, msg.timings)
            if msg.HasField("merge"):
                summary += " " + format_merge(msg.merge)
            print(summary, file=sys.stderr)
    except KeyboardInterrupt:
        call.cancel()  # stops the server's work for this request
        print()
        return 130
    return 0


def cmd_merge(args: argparse.Namespace, client: HotmergeClient) -> int:
    args.merge = args.ids
    spec = merge_request(_merge_spec(args)).merged_adapters
    reply = client.merge(spec, name=args.name)
    if is_identity(parse_merge_spec(spec, max_adapters=None)):
        state = "no merge needed: served as the adapter itself"
    else:
        state = "cache hit" if reply.cache_hit else f"merged in {reply.merge_ms:.2f} ms"
    print(
        f"{reply.merge_key} (affinity {reply.affinity_key}): rank {reply.rank}, "
        f"{reply.bytes / 2**20:.2f} MiB, {state}, adapter load {reply.adapter_load_ms:.1f} ms"
    )
    return 0


def cmd_merges(args: argparse.Namespace, client: HotmergeClient) -> int:
    reply = client.list_merges()
    print(
        f"{len(reply.merges)} merged adapters, {reply.used_bytes / 2**20:.2f} of "
        f"{reply.budget_bytes / 2**20:.2f} MiB"
    )
    if not reply.merges:
        return 0
    now = time.time()
    rows = [
        (
            m.merge_key,
            m.affinity_key,
            _spec_text(m.spec),
            m.rank,
            f"{m.bytes / 2**20:.2f}",
            m.hits,
            f"{now - m.last_used_unix_s:.0f} s ago",
            "yes" if m.in_use else "no",
        )
        for m in reply.merges
    ]
    header = ("cache key", "affinity key", "spec", "rank", "MiB", "hits", "last use", "in use")
    print(format_table(header, rows))
    return 0


def _spec_text(spec: pb.MergedAdapters) -> str:
    """``ties(a:1, b:0.5) density=0.5``: the spec in one short line."""
    strategy = pb.MergeStrategy.Name(spec.merge_strategy).lower()
    weights = ", ".join(f"{i}:{w:g}" for i, w in zip(spec.ids, spec.weights, strict=False))
    extra = []
    if spec.HasField("density") and spec.density != 1.0:
        extra.append(f"density={spec.density:g}")
    if strategy.startswith("dare"):
        extra.append(f"seed={spec.seed}")
    if spec.HasField("svd_rank"):
        extra.append(f"svd_rank={spec.svd_rank}")
    if spec.HasField("svd_clamp"):
        extra.append(f"svd_clamp={spec.svd_clamp:g}")
    return " ".join([f"{strategy}({weights})", *extra])


def cmd_export(args: argparse.Namespace) -> int:
    from hotmerge.merging.export import export_merge
    from hotmerge.merging.spec import parse_merge_spec

    args.merge = args.ids
    root = args.adapter_root or settings.adapter_root() or "."
    import torch  # only export runs the engine here

    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        spec = parse_merge_spec(pb.MergedAdapters(**_merge_spec(args)), max_adapters=None)
        result = export_merge(spec, root, args.out, device=args.device, dtype=dtype)
    except (OSError, HotmergeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {result.directory}: rank {result.rank}, {result.modules} modules, "
        f"{result.nbytes / 2**20:.2f} MiB (merged in {result.merge_ms:.1f} ms, {result.backend})"
    )
    return 0


def cmd_info(args: argparse.Namespace, client: HotmergeClient) -> int:
    info = client.info()
    for field in info.DESCRIPTOR.fields:
        value = getattr(info, field.name)
        if not isinstance(value, str | int | float):  # a repeated field
            value = ", ".join(value) or "-"
        print(f"{field.name}: {value}")
    return 0


def cmd_adapters(args: argparse.Namespace, client: HotmergeClient) -> int:
    adapters = client.list_adapters()
    if not adapters:
        print("no adapters (none loaded, none under the adapter root; see `hotmerge info`)")
        return 0
    rows = [
        (
            a.id,
            a.rank,
            f"{a.alpha:g}",
            "yes" if a.use_rslora else "no",
            "yes" if a.loaded else "no",
            f"{a.bytes / 2**20:.2f}",
            a.revision,
            ",".join(a.target_modules),
        )
        for a in adapters
    ]
    header = ("id", "rank", "alpha", "rslora", "loaded", "MiB", "revision", "target_modules")
    print(format_table(header, rows))
    return 0


def cmd_load(args: argparse.Namespace, client: HotmergeClient) -> int:
    reply = client.load_adapter(args.adapter_id)
    a = reply.adapter
    print(f"loaded {a.id}: rank {a.rank}, {a.bytes / 2**20:.2f} MiB, in {reply.load_ms:.1f} ms")
    return 0


def cmd_unload(args: argparse.Namespace, client: HotmergeClient) -> int:
    if client.unload_adapter(args.adapter_id):
        print(f"unloaded {args.adapter_id}")
    else:
        print(f"{args.adapter_id} was not loaded")
    return 0


# -- parser -----------------------------------------------------------------------------------


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the gRPC server")
    p.set_defaults(run=cmd_serve)
    d = _DEFAULTS
    for flag, kind, text in (
        ("--model", str, "model directory (or hub id with --allow-hub); default: the embedded "
         "tiny random Llama with demo adapters"),
        ("--data-dir", Path, "where the embedded default is built (default: "
         f"${settings.DATA_DIR_ENV} or ./data)"),
        ("--adapter-root", Path, "PEFT adapters, one folder per id (default: DATA_DIR/adapters)"),
        ("--device", str, "cpu, cuda, cuda:1 ... (default: cuda when available)"),
        ("--dtype", str, "float32, float16, bfloat16 (default: bfloat16 on cuda, else float32)"),
        ("--host", str, f"address to listen on (default: {d['host']})"),
        ("--port", int, f"0 for any free port (default: {d['port']})"),
        ("--max-batch-size", int, f"(default: {d['max_batch_size']})"),
        ("--kv-cache-fraction", float, "fraction of the device memory free after the weights "
         f"and LoRA budgets given to the KV cache (CUDA; default: {d['kv_cache_fraction']})"),
        ("--kv-cache-tokens", int, "exact KV cache capacity in tokens (default: from "
         "--kv-cache-fraction on CUDA, a full batch of max-total-tokens on CPU)"),
        ("--block-size", int, f"tokens per KV cache block (default: {d['block_size']})"),
        ("--max-loras", int, f"adapter slots on the device (default: {d['max_loras']})"),
        ("--max-lora-rank", int, f"widest adapter a slot holds (default: {d['max_lora_rank']})"),
        ("--max-prefill-tokens", int, "prompt tokens prefilled per step; longer prompts go in "
         f"chunks (default: {d['max_prefill_tokens']})"),
        ("--max-input-tokens", int, "(default: the model's context length - 1)"),
        ("--max-total-tokens", int, "prompt + generated (default: the model's context length)"),
        ("--default-max-new-tokens", int, f"(default: {d['default_max_new_tokens']})"),
        ("--adapter-budget-mib", float, "device memory for resident adapters "
         f"(default: {d['adapter_budget_bytes'] // 2**20})"),
        ("--merge-budget-mib", float, "device memory for cached merged adapters "
         f"(default: {d['merge_budget_bytes'] // 2**20})"),
        ("--max-merge-adapters", int, f"adapters in one merge spec "
         f"(default: {d['max_merge_adapters']})"),
        ("--max-wait-s", float, "longest wait for adapter or merge-cache room, or for another "
         f"request's load or merge, when the deadline is later (default: {d['max_wait_s']})"),
        ("--max-workers", int, f"RPC threads = concurrent requests (default: {d['max_workers']})"),
        ("--grace-s", float, f"on shutdown, time for in-flight requests (default: {d['grace_s']})"),
        ("--http-port", int, "LoRAX REST, OpenAI API, /metrics, /healthz, /readyz over HTTP "
         f"(0: any free port, -1: off; default: {d['http_port']})"),
        ("--merges", Path, "JSON file of named merges to register at start: "
         '{"name": {"ids": [...], "weights": [...], "merge_strategy": "ties", ...}}'),
        ("--max-connection-idle-s", float, "close gRPC connections idle this long "
         f"(default: {d['max_connection_idle_s']})"),
        ("--http-keep-alive-s", float, "close idle HTTP keep-alive connections after this long "
         f"(default: {d['http_keep_alive_s']})"),
        ("--keepalive-time-s", float, f"(default: {d['keepalive_time_s']})"),
        ("--max-connection-age-s", float, "close client connections after this long, so they "
         f"rebalance (default: {d['max_connection_age_s']})"),
        ("--log-level", str, f"(default: {d['log_level']})"),
    ):  # fmt: skip
        p.add_argument(flag, type=kind, help=text)
    p.add_argument("--allow-hub", action="store_true", default=None, help="download from the hub")
    p.add_argument("--quantize", choices=QUANT_FORMATS, default=None,
                   help="quantize the base's linear weights at load (default: none)")  # fmt: skip
    p.add_argument(
        "--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None,
        help="run decode eagerly instead of replaying captured CUDA graphs",
    )  # fmt: skip
    p.add_argument(
        "--no-prefix-caching", dest="prefix_caching", action="store_false", default=None,
        help="compute every prompt's KV, never reusing a cached prefix's blocks",
    )  # fmt: skip
    p.add_argument(
        "--no-mixed-steps", dest="mixed_steps", action="store_false", default=None,
        help="run prompt chunks in a forward of their own, not with the decode rows",
    )  # fmt: skip
    p.add_argument(
        "--eager-model", action="store_true", default=None,
        help="run the model through transformers' own forward (any architecture, slower)",
    )  # fmt: skip


def _merge_arguments(p: argparse.ArgumentParser, ids: str, ids_help: str) -> None:
    strategies = [s.value for s in Strategy]
    p.add_argument(ids, help=ids_help)
    p.add_argument("--weights", help="comma-separated, one per id (default: 1 each)")
    p.add_argument("--strategy", choices=strategies, default="linear")
    p.add_argument("--density", type=float, help="fraction kept by trim / DARE, in (0, 1]")
    p.add_argument("--sign-method", choices=["total", "frequency"], default="total")
    p.add_argument("--merge-seed", type=int, default=0, help="DARE's seed (default: 0)")
    p.add_argument("--svd-rank", type=int, help="*_svd: merged rank (default: largest input)")
    p.add_argument("--svd-clamp", type=float, help="*_svd: clamp quantile of the factors")


def _export_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="merge a spec offline and write it as a PEFT adapter directory"
    )
    p.set_defaults(run=cmd_export)
    _merge_arguments(p, "ids", "comma-separated adapter ids (directories under the root)")
    p.add_argument("--out", required=True, help="directory to write the PEFT adapter to")
    p.add_argument(
        "--adapter-root",
        help=f"where the adapters are (default: ${settings.ADAPTER_ROOT_ENV} or .)",
    )
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="merged dtype (default: the first adapter's)")  # fmt: skip


def _client_parsers(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target",
        default=settings.target(DEFAULT_TARGET),
        help=f"server address (default: ${settings.TARGET_ENV} or {DEFAULT_TARGET})",
    )
    common.add_argument("--timeout", type=float, default=120.0, help="seconds (default: 120)")

    p = sub.add_parser("generate", parents=[common], help="generate text")
    p.set_defaults(run=cmd_generate)
    a = p.add_argument
    a("prompt")
    a("--adapter", help="adapter id (default: the base model)")
    a("--max-new-tokens", type=int)
    a("--temperature", type=float, help="sampling temperature (> 0 and != 1 turns sampling on)")
    a("--top-p", type=float)
    a("--top-k", type=int)
    a("--do-sample", action="store_true")
    a("--seed", type=int)
    a("--repetition-penalty", type=float)
    a("--stop", action="append", help="stop sequence (repeatable)")
    a("--details", action="store_true", help="also print each token's id and logprob (stderr)")
    a("--stream", action="store_true", help="print tokens as they come")
    _merge_arguments(p, "--merge", "merge these comma-separated adapter ids for this request")

    p = sub.add_parser("merge", parents=[common], help="merge a spec without generating")
    p.set_defaults(run=cmd_merge)
    _merge_arguments(p, "ids", "comma-separated adapter ids")
    p.add_argument("--name", default="", help="also register the spec under this name")

    sub.add_parser("merges", parents=[common], help="list cached merged adapters").set_defaults(
        run=cmd_merges
    )
    sub.add_parser("info", parents=[common], help="model, limits, version").set_defaults(
        run=cmd_info
    )
    sub.add_parser("adapters", parents=[common], help="list adapters").set_defaults(
        run=cmd_adapters
    )
    p = sub.add_parser("load", parents=[common], help="load an adapter onto the device")
    p.add_argument("adapter_id")
    p.set_defaults(run=cmd_load)
    p = sub.add_parser("unload", parents=[common], help="drop an adapter from the device")
    p.add_argument("adapter_id")
    p.set_defaults(run=cmd_unload)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hotmerge", description="Serve LoRA adapters over gRPC, and talk to such a server."
    )
    parser.add_argument("--version", action="version", version=f"hotmerge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _export_parser(sub)
    _client_parsers(sub)
    add_eval_parsers(sub)
    return parser


def _unreachable(err: grpc.RpcError) -> bool:
    """Whether the RPC failed to reach a server at all (connection refused, no such host)."""
    details = (err.details() or "").lower()
    return any(s in details for s in ("failed to connect", "connection refused", "dns", "unreach"))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("serve", "export", "eval", "sweep"):
        return args.run(args)
    with HotmergeClient(args.target, timeout=args.timeout) as client:
        try:
            return args.run(args, client)
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            # Not for a server that answered (e.g. "the model is still loading").
            if err.code() == grpc.StatusCode.UNAVAILABLE and _unreachable(err):
                print(f"(is `hotmerge serve` running at {args.target}?)", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
