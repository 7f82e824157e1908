"""The ``hotmerge`` command line: its parser (``build_parser``) and the argv fix-up that lets
option values start with '-' (``join_negative_values``). The commands are in ``cli.py``."""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from hotmerge_kernels.merge.params import Strategy

from hotmerge import __version__, settings
from hotmerge.cli_eval import add_eval_parsers
from hotmerge.client import DEFAULT_TARGET
from hotmerge.config import ServerConfig
from hotmerge.engine.config import QUANT_FORMATS, EngineConfig

# The serve command's options: the server's config fields, and its engine's (--max-batch-size...).
ENGINE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
DEFAULTS = {
    **{f.name: f.default for f in dataclasses.fields(ServerConfig) if f.name != "engine"},
    **ENGINE_DEFAULTS,
}


def _serve_parser(sub, commands) -> None:
    p = sub.add_parser("serve", help="run the gRPC server")
    p.set_defaults(run=commands["serve"])
    d = DEFAULTS
    for flag, kind, text in (
        ("--model", str, "model directory, .gguf file (converted once under DATA_DIR/models) "
         "or hub id with --allow-hub; default: the embedded SmolLM2-135M-Instruct with its "
         "skill adapters ($HOTMERGE_EMBEDDED=tiny: a tiny random Llama)"),
        ("--data-dir", Path, "where the embedded default is built (default: "
         f"${settings.DATA_DIR_ENV} or ./data)"),
        ("--adapter-root", Path, "PEFT adapters, one folder per id (default: DATA_DIR/adapters)"),
        ("--device", str, "cpu, cuda, cuda:1 ... (default: cuda when available)"),
        ("--dtype", str, "float32, float16, bfloat16 (default: bfloat16 on cuda, else float32)"),
        ("--host", str, f"address to listen on (default: {d['host']}, this machine only; "
         "0.0.0.0 for every interface)"),
        ("--api-key", str, "require 'Authorization: Bearer KEY' (HTTP) / metadata "
         "'authorization: Bearer KEY' (gRPC) on every call but health and metrics"),
        ("--api-key-file", Path, "read the API key from this file (keeps it out of `ps`)"),
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
        ("--max-named-merges", int, f"names registered at once "
         f"(default: {d['max_named_merges']})"),
        ("--http-max-body-bytes", int, "HTTP request bodies larger than this get 413 "
         f"(default: {d['http_max_body_bytes']})"),
        ("--max-wait-s", float, "longest wait for adapter or merge-cache room, or for another "
         f"request's load or merge, when the deadline is later (default: {d['max_wait_s']})"),
        ("--max-workers", int, "threads for RPCs' blocking work: merges, adapter loads "
         f"(default: {d['max_workers']}; streams need none)"),
        ("--grace-s", float, f"on shutdown, time for in-flight requests (default: {d['grace_s']})"),
        ("--http-port", int, "LoRAX REST, OpenAI API, /metrics, /healthz, /readyz over HTTP "
         f"(0: any free port, -1: off; default: {d['http_port']})"),
        ("--merges", Path, "JSON file of named merges to register at start: "
         '{"name": {"ids": [...], "weights": [...], "merge_strategy": "ties", ...}}'),
        ("--max-connection-idle-s", float, "close gRPC connections idle this long "
         f"(default: {d['max_connection_idle_s']})"),
        ("--http-keep-alive-s", float, "close idle HTTP keep-alive connections after this long "
         f"(default: {d['http_keep_alive_s']})"),
        ("--http-max-connections", int, "beyond this many open HTTP connections, routes but "
         f"health and /metrics answer 503 (default: {d['http_max_connections']})"),
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
        "--no-plan-ahead", dest="plan_ahead", action="store_false", default=None,
        help="wait for each step's tokens before launching the next (no step planned ahead)",
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


def _export_parser(sub, commands) -> None:
    p = sub.add_parser(
        "export", help="merge a spec offline and write it as a PEFT adapter directory"
    )
    p.set_defaults(run=commands["export"])
    _merge_arguments(p, "ids", "comma-separated adapter ids (directories under the root)")
    p.add_argument("--out", required=True, help="directory to write the PEFT adapter to")
    p.add_argument(
        "--adapter-root",
        help=f"where the adapters are (default: ${settings.ADAPTER_ROOT_ENV} or .)",
    )
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="merged dtype (default: the first adapter's)")  # fmt: skip


def _client_parsers(sub, commands) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target",
        default=settings.target(DEFAULT_TARGET),
        help=f"server address (default: ${settings.TARGET_ENV} or {DEFAULT_TARGET})",
    )
    common.add_argument("--timeout", type=float, default=120.0, help="seconds (default: 120)")
    common.add_argument(
        "--api-key",
        default=settings.api_key(),
        help=f"the server's API key (default: ${settings.API_KEY_ENV})",
    )

    p = sub.add_parser("generate", parents=[common], help="generate text")
    p.set_defaults(run=commands["generate"])
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
    p.set_defaults(run=commands["merge"])
    _merge_arguments(p, "ids", "comma-separated adapter ids")
    p.add_argument("--name", default="", help="also register the spec under this name")
    p.add_argument("--replace", action="store_true", help="replace the spec of --name if taken")

    sub.add_parser("merges", parents=[common], help="list cached merged adapters").set_defaults(
        run=commands["merges"]
    )
    sub.add_parser("info", parents=[common], help="model, limits, version").set_defaults(
        run=commands["info"]
    )
    sub.add_parser("adapters", parents=[common], help="list adapters").set_defaults(
        run=commands["adapters"]
    )
    p = sub.add_parser("load", parents=[common], help="load an adapter onto the device")
    p.add_argument("adapter_id")
    p.set_defaults(run=commands["load"])
    p = sub.add_parser("unload", parents=[common], help="drop an adapter from the device")
    p.add_argument("adapter_id")
    p.set_defaults(run=commands["unload"])


def build_parser(commands: Mapping[str, Callable]) -> argparse.ArgumentParser:
    """The ``hotmerge`` parser; ``commands`` maps each subcommand to the function it runs."""
    parser = argparse.ArgumentParser(
        prog="hotmerge", description="Serve LoRA adapters over gRPC, and talk to such a server."
    )
    parser.add_argument("--version", action="version", version=f"hotmerge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub, commands)
    _export_parser(sub, commands)
    _client_parsers(sub, commands)
    add_eval_parsers(sub)
    return parser


# A value that starts with '-' but is a number or a list of numbers ("-1", "-1,0.5", "-.5e3").
_NEGATIVE_VALUE = re.compile(r"-[0-9.][0-9.eE+,-]*")
# Options that take no value: a number after one is a positional argument.
_FLAGS = frozenset(
    ("--stream", "--do-sample", "--details", "--replace", "--allow-hub", "--no-cuda-graphs",
     "--no-prefix-caching", "--no-mixed-steps", "--no-plan-ahead", "--eager-model", "--version",
     "--help", "--base", "--no-references", "--no-loglik", "--raw-prompts", "--no-progress",
     "--serve")
)  # fmt: skip


def join_negative_values(argv: Sequence[str]) -> list[str]:
    """``--weights -1,0.5`` as ``--weights=-1,0.5``: argparse reads a value starting with '-'
    as an option unless it is a single plain number."""
    out: list[str] = []
    for arg in argv:
        if (
            out
            and out[-1].startswith("--")
            and "=" not in out[-1]
            and out[-1] not in _FLAGS
            and _NEGATIVE_VALUE.fullmatch(arg)
        ):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out
