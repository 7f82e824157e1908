"""The sweep's figure (PNG, matplotlib's Agg backend: no display needed).

- two skills: a scatter of skill A vs skill B, every candidate labelled, the Pareto front drawn
  as a staircase, the references (base, single adapters) and the chosen merge marked;
- three or more: parallel coordinates, one line per candidate over the skills, the front and
  references in colour, the rest grey;
- one skill: a bar per candidate.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hotmerge.evaluation.sweep import Ranking

_REF, _FRONT, _OTHER, _CHOSEN = "tab:blue", "tab:red", "0.6", "gold"


def plot_sweep(ranking: Ranking, skill_names: Sequence[str], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = [i for i, r in enumerate(ranking.records) if r["status"] == "ok"]
    if not idx:
        raise ValueError("no candidate was scored: nothing to plot")
    draw = {1: _bars, 2: _scatter}.get(len(skill_names), _parallel)
    fig, ax = plt.subplots(figsize=(9, 7) if len(skill_names) == 2 else (11, 6), dpi=110)
    draw(ax, ranking, skill_names, idx)
    ax.set_title(title or f"hotmerge sweep: {len(idx)} candidates")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def _style(ranking: Ranking, i: int) -> tuple[str, str]:
    """(colour, marker) of record i."""
    if ranking.chosen == i:
        return _CHOSEN, "*"
    if ranking.records[i]["kind"] != "merge":
        return _REF, "s"
    return (_FRONT, "o") if ranking.front[i] else (_OTHER, "o")


def _scatter(ax, ranking: Ranking, skills: Sequence[str], idx: list[int]) -> None:
    a, b = skills
    labels: dict[tuple[float, float], list[str]] = {}  # candidates that score the same share one
    for i in idx:
        r = ranking.records[i]
        x, y = r["scores"][a], r["scores"][b]
        colour, marker = _style(ranking, i)
        size, z = (220 if marker == "*" else 50), (4 if marker == "s" else 3)  # refs on top
        ax.scatter(x, y, c=colour, marker=marker, s=size, edgecolors="black", linewidths=0.5,
                   zorder=z)  # fmt: skip
        labels.setdefault((x, y), []).append(r["label"])
    for (x, y), text_y, names in _spread(labels):
        ax.annotate("\n".join(names), (x, y), xytext=(x + 0.03, text_y), fontsize=7, va="center",
                    arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.5"})  # fmt: skip
    front = sorted(
        ((ranking.records[i]["scores"][a], ranking.records[i]["scores"][b])
         for i in idx if ranking.front[i]),
        key=lambda p: (p[0], -p[1]),
    )  # fmt: skip
    if front:  # the edge of what the front dominates: down from each point, across to the next
        xs, ys = [front[0][0]], [front[0][1]]
        for x, y in front[1:]:
            xs += [xs[-1], x]
            ys += [y, y]
        ax.plot(xs, ys, color=_FRONT, lw=1.2, ls="--", zorder=2, label="Pareto front")
    ax.scatter([], [], c=_REF, marker="s", label="base / single adapter")
    ax.scatter([], [], c=_FRONT, marker="o", label="merge on the front")
    ax.scatter([], [], c=_OTHER, marker="o", label="other merge")
    ax.scatter([], [], c=_CHOSEN, marker="*", s=120, label="chosen")
    ax.set_xlabel(f"{a} score")
    ax.set_ylabel(f"{b} score")
    ax.set_xlim(-0.05, 1.45)  # room for the labels right of the points
    ax.set_xticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylim(-0.08, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # off the points


def _spread(labels: dict[tuple[float, float], list[str]], gap: float = 0.035):
    """(point, label height, names): labels of points close in x stacked at least ``gap`` apart
    (score units), so that a crowded corner stays legible; each keeps a line to its point."""
    placed: list[tuple[tuple[float, float], float, list[str]]] = []
    for (x, y), names in sorted(labels.items(), key=lambda kv: -kv[0][1]):
        near = [h - gap * len(n) for (px, _), h, n in placed if abs(px - x) < 0.15]
        height = min([y, *near]) if near else y
        placed.append(((x, y), height - gap * (len(names) - 1) / 2, names))
    return placed


def _parallel(ax, ranking: Ranking, skills: Sequence[str], idx: list[int]) -> None:
    xs = list(range(len(skills)))
    for i in sorted(idx, key=lambda i: (ranking.front[i], ranking.chosen == i)):  # grey first
        r = ranking.records[i]
        colour, _ = _style(ranking, i)
        on_top = colour != _OTHER
        ax.plot(xs, [r["scores"][s] for s in skills], color=colour, marker="o",
                lw=2.0 if on_top else 0.8, alpha=1.0 if on_top else 0.5,
                zorder=3 if on_top else 1)  # fmt: skip
        if on_top:
            ax.annotate(r["label"], (xs[-1], r["scores"][skills[-1]]), xytext=(5, 0),
                        textcoords="offset points", fontsize=7, va="center")  # fmt: skip
    ax.plot([], [], color=_REF, label="base / single adapter")
    ax.plot([], [], color=_FRONT, label="merge on the Pareto front")
    ax.plot([], [], color=_OTHER, label="other merge")
    ax.plot([], [], color=_CHOSEN, label="chosen")
    ax.set_xticks(xs, [f"{s} score" for s in skills])
    ax.set_xlim(-0.2, len(skills) - 0.4)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)


def _bars(ax, ranking: Ranking, skills: Sequence[str], idx: list[int]) -> None:
    (skill,) = skills
    labels = [ranking.records[i]["label"] for i in idx]
    ax.barh(labels, [ranking.records[i]["scores"][skill] for i in idx],
            color=[_style(ranking, i)[0] for i in idx])  # fmt: skip
    ax.set_xlabel(f"{skill} score")
    ax.set_xlim(0, 1.05)
    ax.invert_yaxis()
