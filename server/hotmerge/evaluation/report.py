"""Output files: the sweep's table (CSV, JSON, markdown) and an evaluation's JSON and markdown."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hotmerge.evaluation.eval import EvalResult
from hotmerge.evaluation.sweep import Ranking


def _num(x: float | None, digits: int = 3) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def table_rows(ranking: Ranking, skill_names: Sequence[str]) -> list[dict[str, Any]]:
    """One flat row per candidate: scores per skill, their min and mean, loglik, timings."""
    rows = []
    for i, r in enumerate(ranking.records):
        scores = r.get("scores") or {}
        loglik = r.get("loglik") or {}
        row: dict[str, Any] = {
            "label": r["label"],
            "kind": r["kind"],
            "status": r["status"],
            "front": ranking.front[i],
            "chosen": ranking.chosen == i,
        }
        for s in skill_names:
            row[f"score:{s}"] = scores.get(s)
        values = [scores[s] for s in skill_names if s in scores]
        row["min_score"] = min(values) if values else None
        row["mean_score"] = sum(values) / len(values) if values else None
        for s in skill_names:
            row[f"loglik:{s}"] = loglik.get(s)
        row["merge_ms"] = r.get("merge_ms")
        row["eval_s"] = r.get("eval_s")
        row["key"] = r["key"]
        row["spec"] = json.dumps(r["spec"], sort_keys=True) if r.get("spec") else ""
        row["error"] = r.get("error", "")
        rows.append(row)
    return rows


def write_sweep_tables(
    ranking: Ranking,
    skill_names: Sequence[str],
    out_dir: Path,
    meta: Mapping[str, Any] | None = None,
    stem: str = "sweep",
) -> dict[str, Path]:
    """``meta``: what the run was (model, settings, timing), at the top of the JSON."""
    rows = table_rows(ranking, skill_names)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("csv", "json", "md")}
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["label"])
        writer.writeheader()
        writer.writerows(rows)
    chosen = ranking.records[ranking.chosen] if ranking.chosen is not None else None
    doc = {**(meta or {}), "skills": list(skill_names), "chosen": chosen, "candidates": rows}
    paths["json"].write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    intro = "".join(f"{k}: {v}  \n" for k, v in (meta or {}).items())
    paths["md"].write_text((intro + "\n" if intro else "") + sweep_markdown(rows, skill_names))
    return paths


def sweep_markdown(rows: Sequence[Mapping[str, Any]], skill_names: Sequence[str]) -> str:
    header = ["candidate", "kind", *skill_names, "min", "mean", "loglik", "merge ms", "front"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        label = f"**{row['label']}** (chosen)" if row["chosen"] else row["label"]
        if row["status"] != "ok":
            cells = [label, row["kind"], *[""] * (len(header) - 3), f"{row['status']}"]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        logliks = [row[f"loglik:{s}"] for s in skill_names if row[f"loglik:{s}"] is not None]
        cells = [
            label,
            row["kind"],
            *[_num(row[f"score:{s}"]) for s in skill_names],
            _num(row["min_score"]),
            _num(row["mean_score"]),
            _num(sum(logliks) / len(logliks) if logliks else None),
            _num(row["merge_ms"], 2) if row["kind"] == "merge" else "",
            "yes" if row["front"] else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    errors = [r for r in rows if r["status"] != "ok"]
    if errors:
        lines += ["", "Not scored:", ""]
        lines += [f"- {r['label']}: {r['status']}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def write_eval(
    results: Mapping[str, EvalResult], meta: Mapping[str, Any], out_dir: Path, stem: str = "eval"
) -> dict[str, Path]:
    """``results``: by target label. JSON holds every example's completion and scores."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("json", "md")}
    doc = {
        **meta,
        "targets": {
            label: {**r.summary(), "examples": [vars(e) for e in r.examples]}
            for label, r in results.items()
        },
    }
    paths["json"].write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["| target | skill | n | score | loglik | merge ms |", "|---|---|---|---|---|---|"]
    for label, r in results.items():
        merge = _num(r.merge_ms, 2) if r.merge_key else ""
        for name, s in r.skills.items():
            lines.append(
                f"| {label} | {name} | {s.n} | {_num(s.score)} | {_num(s.loglik)} | {merge} |"
            )
    paths["md"].write_text("\n".join(lines) + "\n")
    return paths
