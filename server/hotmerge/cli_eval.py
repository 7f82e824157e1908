"""``hotmerge eval`` and ``hotmerge sweep``: score served targets on skills, sweep merge specs.

    hotmerge eval --skills sql,python --adapter sql-coder --base [-n 100] [--out eval-out]
    hotmerge eval --skills sql --spec '{"ids": ["a", "b"], "merge_strategy": "ties", ...}'
    hotmerge sweep sql-coder,py-coder --skills sql,python --strategies linear,ties,dare_ties \
        --densities 0.3,0.5,0.7 --weights 1,1 --weights 0.7,0.7 --seeds 0,1 \
        [--grid grid.yaml] [--register best] [--export merged/] [--out sweep-out]

Both talk to a running server (``--target``) or start one in this process (``--serve``, with
``--model`` / ``--adapter-root``; the embedded default without them). See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from hotmerge import settings
from hotmerge.client import DEFAULT_TARGET, HotmergeClient
from hotmerge.engine.config import QUANT_FORMATS
from hotmerge.errors import HotmergeError, InvalidArgument
from hotmerge.evaluation.eval import (
    EvalError,
    EvalSettings,
    Prompter,
    Target,
    evaluate,
    load_examples,
    probe_score_tokens,
)
from hotmerge.evaluation.grid import expand, load_grid_file, make_grid, references, spec_label
from hotmerge.evaluation.pareto import parse_criterion
from hotmerge.evaluation.plot import plot_sweep
from hotmerge.evaluation.report import write_eval, write_sweep_tables
from hotmerge.evaluation.sweep import rank, run_sweep, settings_key
from hotmerge.merging.spec import merged_adapters_from_dict, parse_merge_spec

# -- shared setup -----------------------------------------------------------------------------


@dataclass
class Session:
    """A client, the tokenizer of the served model, and where the adapters are (for export)."""

    client: HotmergeClient
    tokenizer: Any
    model_id: str  # with the dtype: part of the settings key
    adapter_root: str


@contextmanager
def session(args: argparse.Namespace) -> Iterator[Session]:
    """Connect to ``--target``, or start a server here with ``--serve`` (stopped on exit)."""
    running = None
    target = args.target
    if args.serve:
        from hotmerge.config import ServerConfig
        from hotmerge.engine.config import EngineConfig
        from hotmerge.server import start_server

        options = {k: getattr(args, k) for k in ("model", "device", "dtype")}
        options = {k: v for k, v in options.items() if v is not None}
        engine = {k: getattr(args, k) for k in ("max_batch_size", "quantize")}
        engine = {k: v for k, v in engine.items() if v is not None}
        if engine:  # engine fields (ServerConfig.engine)
            options["engine"] = EngineConfig(**engine)
        if args.adapter_root:
            options["adapter_root"] = Path(args.adapter_root)
        if args.data_dir:
            options["data_dir"] = Path(args.data_dir)
        config = ServerConfig(host="127.0.0.1", port=0, http_port=None, **options)
        print("starting a server in this process ...", file=sys.stderr)
        running = start_server(config)
        target = running.target
    try:
        with HotmergeClient(target, timeout=args.timeout, api_key=args.api_key) as client:
            info = client.info()
            if running is not None:
                tokenizer = running.engine.runner.tokenizer
            else:
                tokenizer = _load_tokenizer(args.tokenizer or info.model_id)
            root = args.adapter_root or info.adapter_source.rsplit(" (", 1)[0]
            dtype = f"{info.dtype}, {info.quantize}" if info.quantize else info.dtype
            yield Session(client, tokenizer, f"{info.model_id} ({dtype})", root)
    finally:
        if running is not None:
            running.stop(0)


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise InvalidArgument(
            f"the served model {path!r} is not a folder here: give --tokenizer (a folder with "
            "the model's tokenizer) to render the prompts"
        )
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def resolve_skills(names: str) -> list[Any]:
    try:
        from hotmerge.skills import SKILLS
    except ImportError as err:
        raise InvalidArgument(f"the skills are not available ({err})") from None
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in SKILLS]
    if unknown or not wanted:
        raise InvalidArgument(f"--skills: unknown {unknown}; known: {', '.join(sorted(SKILLS))}")
    return [SKILLS[n] for n in wanted]


def _prompter(args: argparse.Namespace, tokenizer) -> Prompter:
    if args.raw_prompts:
        return Prompter(tokenizer, None)
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidArgument(
            "the served model's tokenizer has no chat template: pass --raw-prompts to send the "
            "prompts as they are"
        )
    from hotmerge.skills import chat_prompt

    return Prompter(tokenizer, chat_prompt)


def _settings(args: argparse.Namespace, client: HotmergeClient) -> EvalSettings:
    score_tokens = probe_score_tokens(client) if not args.no_loglik else 1
    # Default: two full batches in flight, so the engine's batch stays full between replies.
    concurrency = args.concurrency or 2 * max(1, client.info().max_batch_size)
    return EvalSettings(
        n=args.n, split=args.split, max_new_tokens=args.max_new_tokens,
        loglik=not args.no_loglik, score_new_tokens=score_tokens,
        concurrency=concurrency, timeout_s=args.timeout,
    )  # fmt: skip


def _spec_arg(text: str) -> dict[str, Any]:
    """A merge spec as JSON, inline or ``@file``; checked here so the message is early."""
    raw = Path(text[1:]).read_text() if text.startswith("@") else text
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as err:
        raise InvalidArgument(f"--spec: not JSON ({err})") from None
    parse_merge_spec(merged_adapters_from_dict(spec, where="--spec"), max_adapters=None)
    return spec


# -- commands ---------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    skills = resolve_skills(args.skills)
    targets: list[tuple[str, Target]] = []
    if args.base or not (args.adapter or args.spec):
        targets.append(("base", Target()))
    targets += [(a, Target(adapter_id=a)) for a in args.adapter or []]
    for text in args.spec or []:
        spec = _spec_arg(text)  # labelled with its adapters: two merges may differ only there
        ids = "+".join(str(i) for i in spec.get("ids") or ())
        targets.append((f"{ids} {spec_label(spec)}", Target(spec=spec)))
    labels = [label for label, _ in targets]
    if twice := sorted({label for label in labels if labels.count(label) > 1}):
        raise InvalidArgument(f"the same target given twice: {', '.join(twice)}; give each once")
    with session(args) as s:
        settings = _settings(args, s.client)
        examples = load_examples(skills, settings)
        prompter = _prompter(args, s.tokenizer)
        results = {}
        for label, target in targets:
            try:
                results[label] = evaluate(
                    s.client, target, skills, examples, prompter, settings,
                    label=label, progress=not args.no_progress,
                )  # fmt: skip
            except EvalError as err:
                raise InvalidArgument(f"{label}: {err}") from None
            scores = ", ".join(f"{k} {v.score:.3f}" for k, v in results[label].skills.items())
            print(f"{label}: {scores}")
        meta = {"model": s.model_id, "split": settings.split, "n": settings.n}
        paths = write_eval(results, meta, Path(args.out))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _grid_values(args: argparse.Namespace) -> dict[str, Any]:
    values = load_grid_file(args.grid) if args.grid else {}
    flags = {
        "adapters": args.adapters,
        "strategies": args.strategies,
        "densities": args.densities,
        "weights": args.weights,
        "seeds": args.seeds,
        "svd_rank": args.svd_rank,
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    return values


def cmd_sweep(args: argparse.Namespace) -> int:
    skills = resolve_skills(args.skills)
    names = [s.name for s in skills]
    weights = parse_criterion(args.criterion)
    grid = make_grid(_grid_values(args))
    candidates = ([] if args.no_references else references(grid.adapters)) + expand(grid)
    out = Path(args.out)
    results_path = Path(args.results) if args.results else out / "results.jsonl"
    with session(args) as s:
        settings = _settings(args, s.client)
        examples = load_examples(skills, settings)
        lengths = {sk.name: settings.max_new_tokens or sk.max_new_tokens for sk in skills}
        key = settings_key(
            s.model_id, examples, settings, chat=not args.raw_prompts, max_new_tokens=lengths
        )
        started = time.monotonic()
        records = run_sweep(
            s.client, candidates, skills, examples, _prompter(args, s.tokenizer), settings,
            results_path, key, progress=not args.no_progress,
        )  # fmt: skip
        wall_s = time.monotonic() - started
        ranking = rank(records, names, weights)
        n = {k: len(v) for k, v in examples.items()}
        meta = {
            "model": s.model_id, "examples": n, "settings": key, "criterion": args.criterion,
            "n_candidates": len(candidates),
            "eval_s_total": round(sum(r.get("eval_s", 0.0) for r in records), 2),
            "this_run_wall_s": round(wall_s, 2),
        }  # fmt: skip
        paths = write_sweep_tables(ranking, names, out, meta)
        print(f"{len(candidates)} candidates; this run took {wall_s:.1f} s; the candidates' "
              f"evaluations took {meta['eval_s_total']:.1f} s in all")  # fmt: skip
        if any(r["status"] == "ok" for r in records):
            title = f"{Path(s.model_id.split(' (')[0]).name}: {len(candidates)} candidates, " + (
                ", ".join(f"{k} n={v}" for k, v in n.items())
            )
            paths["png"] = plot_sweep(ranking, names, out / "sweep.png", title)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        if ranking.chosen is None:
            if args.register or args.export:
                print("error: no merge was scored: nothing to register or export", file=sys.stderr)
                return 1
            return 0
        chosen = ranking.records[ranking.chosen]
        print(f"chosen ({args.criterion}): {chosen['label']}  {json.dumps(chosen['spec'])}")
        merges_file = out / "merges.json"  # for `hotmerge serve --merges`: keeps the name
        merges_file.write_text(json.dumps({args.register or "sweep-best": chosen["spec"]}) + "\n")
        if args.register:
            reply = s.client.merge(chosen["spec"], name=args.register)
            print(f"registered {reply.name!r} as {reply.merge_key} (rank {reply.rank})")
        if args.export:
            _export(chosen["spec"], s.adapter_root, Path(args.export))
    return 0


def _export(spec: dict[str, Any], adapter_root: str, out: Path) -> None:
    from hotmerge.merging.export import export_merge

    parsed = parse_merge_spec(merged_adapters_from_dict(spec), max_adapters=None)
    result = export_merge(parsed, adapter_root, out, log=lambda _m: None)
    print(f"exported to {result.directory}: rank {result.rank}, {result.modules} modules")


def run(args: argparse.Namespace) -> int:
    """The entry point of both commands: errors become one line on stderr and exit status 1."""
    try:
        return args.eval_command(args)
    except (HotmergeError, OSError, ValueError) as err:  # bad input, files, server config
        print(f"error: {err}", file=sys.stderr)
        return 1
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1


# -- parsers ----------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--skills", required=True, help="comma-separated skill names (hotmerge.skills)")
    a("-n", type=int, help="examples per skill (default: the whole held-out set)")
    a("--split", default="heldout", choices=["heldout", "train"], help="(default: heldout)")
    a("--max-new-tokens", type=int, help="generation length (default: each skill's)")
    a("--no-loglik", action="store_true", help="skip the reference log-likelihood")
    a("--raw-prompts", action="store_true",
      help="send the prompts without the chat template (for models that have none)")  # fmt: skip
    a("--tokenizer", help="tokenizer folder (default: the served model's folder, from Info)")
    a("--concurrency", type=int,
      help="requests in flight (default: twice the server's max batch size)")  # fmt: skip
    a("--out", help="output folder")
    a("--no-progress", action="store_true", help="no progress bar")
    a("--target", default=settings.target(DEFAULT_TARGET),
      help=f"server address (default: ${settings.TARGET_ENV} or {DEFAULT_TARGET})")  # fmt: skip
    a("--api-key", default=settings.api_key(),
      help=f"the server's API key (default: ${settings.API_KEY_ENV})")  # fmt: skip
    a("--timeout", type=float, default=300.0, help="seconds per request (default: 300)")
    a("--serve", action="store_true", help="start a server in this process instead of --target")
    a("--model", help="with --serve: model folder (default: the embedded default)")
    a("--adapter-root", help="with --serve: adapter folder; for --export: where adapters are "
      "(default: the server's, from Info)")  # fmt: skip
    a("--data-dir", help="with --serve: where the embedded default is built")
    a("--device", help="with --serve: cpu, cuda ...")
    a("--dtype", help="with --serve: float32, bfloat16 ...")
    a("--max-batch-size", type=int, help="with --serve")
    a("--quantize", choices=QUANT_FORMATS, help="with --serve: the base's weight format")


def add_eval_parsers(sub) -> None:
    """Add ``eval`` and ``sweep`` to the ``hotmerge`` subparsers; each sets ``run``."""
    p = sub.add_parser("eval", help="score the base model, adapters or merges on skills")
    _common(p)
    p.add_argument("--base", action="store_true", help="score the base model (the default "
                   "when no --adapter or --spec is given)")  # fmt: skip
    p.add_argument("--adapter", action="append", help="adapter id or named merge (repeatable)")
    p.add_argument("--spec", action="append",
                   help="inline merge spec as JSON, or @file (repeatable)")  # fmt: skip
    p.set_defaults(run=run, eval_command=cmd_eval, out="eval-out")

    p = sub.add_parser("sweep", help="score a grid of merge specs; Pareto front, plot")
    _common(p)
    a = p.add_argument
    a("adapters", nargs="?", help="comma-separated adapter ids to merge (or in --grid)")
    a("--grid", help="YAML/JSON file: adapters, strategies, densities, weights, seeds, svd_rank")
    a("--strategies", help="comma-separated (default: linear,ties,dare_ties)")
    a("--densities", help="comma-separated (default: 0.5)")
    a("--weights", action="append", help="a weight vector, comma-separated, one per adapter "
      "or one for all (repeatable; default: 1 each)")  # fmt: skip
    a("--seeds", help="DARE seeds, comma-separated (default: 0)")
    a("--svd-rank", type=int, help="*_svd strategies: merged rank")
    a("--no-references", action="store_true", help="skip the base model and single adapters")
    a("--results", help="the resumable JSONL (default: OUT/results.jsonl)")
    a("--criterion", default="min", help="how to choose: 'min' (max of the minimum skill "
      "score) or skill weights 'sql=2,python=1' (max of the weighted sum)")  # fmt: skip
    a("--register", help="register the chosen merge on the server under this name")
    a("--export", help="write the chosen merge as a PEFT adapter into this folder")
    p.set_defaults(run=run, eval_command=cmd_sweep, out="sweep-out")
