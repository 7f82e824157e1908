"""Score every candidate of a sweep, resumably, and rank them.

Results go to a JSONL file one line per candidate as each completes. A line records the
candidate's key (its canonical merge spec), the key of the eval settings (model, skills and
their examples, split, generation length, prompt format) and the outcome. A rerun with the same
file skips every candidate whose key and settings key already have an outcome ``ok`` or
``invalid`` (a spec the server refuses is refused again); transient failures (the server was
unreachable, a deadline passed) are tried again.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hotmerge.client import HotmergeClient
from hotmerge.errors import HotmergeError
from hotmerge.evaluation.eval import (
    EvalError,
    EvalSettings,
    Prompter,
    Skill,
    Target,
    evaluate,
)
from hotmerge.evaluation.grid import Candidate
from hotmerge.evaluation.pareto import choose, pareto_front
from hotmerge.merging.spec import merged_adapters_from_dict, parse_merge_spec

DONE = ("ok", "invalid")


def settings_key(
    model_id: str,
    examples: Mapping[str, Sequence[Any]],
    settings: EvalSettings,
    *,
    chat: bool,
    max_new_tokens: Mapping[str, int],
) -> str:
    """What makes two scores comparable: same model, examples, split, lengths, prompt format."""
    digests = {}
    for name, items in sorted(examples.items()):
        h = hashlib.sha256()
        for ex in items:
            h.update(json.dumps([ex.prompt, ex.reference]).encode())
        digests[name] = h.hexdigest()[:16]
    doc = {
        "model": model_id,
        "split": settings.split,
        "examples": digests,
        "max_new_tokens": dict(sorted(max_new_tokens.items())),
        "loglik": settings.loglik,
        "chat": chat,
    }
    text = json.dumps(doc, sort_keys=True)
    return "e-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def load_results(path: Path, settings: str) -> dict[str, dict[str, Any]]:
    """The latest record of each candidate key in ``path`` for these settings."""
    records: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash: that candidate runs again
            continue
        if record.get("settings") == settings:
            records[record["key"]] = record
    return records


def _append(path: Path, record: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()


def _local_problem(candidate: Candidate) -> str | None:
    """Why the server would refuse this merge spec (checked here, without a request)."""
    if candidate.kind != "merge":
        return None
    try:
        parse_merge_spec(merged_adapters_from_dict(candidate.spec or {}), max_adapters=None)
    except HotmergeError as err:
        return str(err)
    return None


def _record(candidate: Candidate, settings: str) -> dict[str, Any]:
    return {
        "key": candidate.key,
        "settings": settings,
        "kind": candidate.kind,
        "label": candidate.label,
        "adapter_id": candidate.adapter_id,
        "spec": candidate.spec,
    }


def score_candidate(
    client: HotmergeClient,
    candidate: Candidate,
    skills: Sequence[Skill],
    examples: Mapping[str, Sequence[Any]],
    prompter: Prompter,
    settings: EvalSettings,
    settings_id: str,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """One candidate's record: ``status`` ok (scores), invalid or error (the message)."""
    record = _record(candidate, settings_id)
    problem = _local_problem(candidate)
    if problem is not None:
        return {**record, "status": "invalid", "error": problem}
    target = Target(adapter_id=candidate.adapter_id, spec=candidate.spec)
    try:
        result = evaluate(
            client, target, skills, examples, prompter, settings,
            label=candidate.label, progress=progress,
        )  # fmt: skip
    except EvalError as err:
        return {**record, "status": "invalid" if err.permanent else "error", "error": str(err)}
    return {
        **record,
        "status": "ok",
        "scores": {name: r.score for name, r in result.skills.items()},
        "loglik": {name: r.loglik for name, r in result.skills.items()},
        "n": {name: r.n for name, r in result.skills.items()},
        "merge_ms": result.merge_ms,
        "merge_cache_hit": result.merge_cache_hit,
        "merge_key": result.merge_key,
        "eval_s": round(result.wall_s, 3),
        "finished_unix_s": round(time.time(), 3),
    }


def run_sweep(
    client: HotmergeClient,
    candidates: Sequence[Candidate],
    skills: Sequence[Skill],
    examples: Mapping[str, Sequence[Any]],
    prompter: Prompter,
    settings: EvalSettings,
    results_path: Path,
    settings_id: str,
    *,
    progress: bool = True,
    log=print,
) -> list[dict[str, Any]]:
    """Score the candidates not yet done in ``results_path``; return one record per candidate,
    in order (those done before come from the file)."""
    done = {k: r for k, r in load_results(results_path, settings_id).items() if r["status"] in DONE}
    todo = [c for c in candidates if c.key not in done]
    log(f"{len(candidates)} candidates: {len(candidates) - len(todo)} done before, "
        f"{len(todo)} to score")  # fmt: skip
    for i, candidate in enumerate(todo, 1):
        record = score_candidate(
            client, candidate, skills, examples, prompter, settings, settings_id,
            progress=progress,
        )  # fmt: skip
        _append(results_path, record)
        done[candidate.key] = record
        log(f"[{i}/{len(todo)}] {candidate.label}: {describe(record)}")
    return [done.get(c.key) or {**_record(c, settings_id), "status": "error"} for c in candidates]


def describe(record: Mapping[str, Any]) -> str:
    if record["status"] != "ok":
        return f"{record['status']}: {record.get('error', '')}"
    scores = ", ".join(f"{k} {v:.3f}" for k, v in record["scores"].items())
    merge = f", merge {record['merge_ms']:.1f} ms" if record.get("merge_key") else ""
    return f"{scores}{merge} ({record['eval_s']:.1f} s)"


@dataclass(frozen=True)
class Ranking:
    """The records with the front marked, and the chosen merge (an index into records)."""

    records: list[dict[str, Any]]
    front: list[bool]
    chosen: int | None


def rank(
    records: Sequence[Mapping[str, Any]],
    skill_names: Sequence[str],
    weights: Mapping[str, float] | None = None,
) -> Ranking:
    """The Pareto front over every scored record (references included: a merge a single adapter
    beats is not on it), and the merge the criterion picks (merges only)."""
    scored = [i for i, r in enumerate(records) if r["status"] == "ok"]
    points = [[records[i]["scores"][s] for s in skill_names] for i in scored]
    on_front = dict(zip(scored, pareto_front(points), strict=True))
    front = [on_front.get(i, False) for i in range(len(records))]
    merges = [i for i in scored if records[i]["kind"] == "merge"]
    tie_break = [_mean_loglik(records[i], skill_names) for i in merges]
    picked = choose(
        [{s: records[i]["scores"][s] for s in skill_names} for i in merges], weights, tie_break
    )
    return Ranking([dict(r) for r in records], front, None if picked is None else merges[picked])


def _mean_loglik(record: Mapping[str, Any], skill_names: Sequence[str]) -> float:
    values = [record.get("loglik", {}).get(s) for s in skill_names]
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else -math.inf
