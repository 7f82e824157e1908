"""The sweep's candidates: a grid of merge specs, and the reference points beside it.

A grid is strategies x weight vectors x densities x seeds over one list of adapters. Axes a
strategy ignores collapse (linear takes no density, only the DARE strategies take a seed), and
specs that merge the same way (one canonical key) appear once, so the grid holds no duplicate
work. Specs the server would refuse (slerp of three adapters) are kept: the sweep records them
as errors, so the table shows what was tried.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hotmerge_kernels.merge.params import Strategy

from hotmerge.errors import HotmergeError, InvalidArgument
from hotmerge.merging.spec import affinity_key, merged_adapters_from_dict

DEFAULT_STRATEGIES = ("linear", "ties", "dare_ties")
DEFAULT_DENSITIES = (0.5,)
GRID_FIELDS = ("adapters", "strategies", "densities", "weights", "seeds", "svd_rank")


@dataclass(frozen=True)
class Candidate:
    """One thing to score: the base model (no adapter), one adapter, or a merge spec."""

    kind: str  # "base" | "adapter" | "merge"
    label: str
    adapter_id: str | None = None
    spec: Mapping[str, Any] | None = None  # fields of MergedAdapters (JSON form)
    key: str = field(default="")

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", candidate_key(self))


def candidate_key(c: Candidate) -> str:
    """Stable across runs: the merge's affinity key (canonical spec), or what it names."""
    if c.kind == "base":
        return "base"
    if c.kind == "adapter":
        return f"adapter:{c.adapter_id}"
    try:
        return affinity_key(merged_adapters_from_dict(c.spec or {}))
    except HotmergeError:  # an invalid spec still needs a key, to be skipped on a rerun
        text = json.dumps(c.spec, sort_keys=True)
        return "invalid-" + hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Grid:
    adapters: tuple[str, ...]
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    densities: tuple[float, ...] = DEFAULT_DENSITIES
    weights: tuple[tuple[float, ...], ...] = ()  # empty: 1.0 for each adapter
    seeds: tuple[int, ...] = (0,)
    svd_rank: int | None = None  # the *_svd strategies' merged rank (None: the largest input)

    def __post_init__(self) -> None:
        if not self.adapters:
            raise InvalidArgument("sweep: give the adapters to merge (two or more ids)")
        known = {s.value for s in Strategy}
        for name in self.strategies:
            if name not in known:
                raise InvalidArgument(
                    f"sweep strategies: unknown {name!r}; use some of {', '.join(sorted(known))}"
                )
        for w in self.weights:
            if len(w) not in (1, len(self.adapters)):
                raise InvalidArgument(
                    f"sweep weights {list(w)}: give one weight per adapter "
                    f"({len(self.adapters)}), or a single weight for all"
                )


def weight_vectors(grid: Grid) -> list[tuple[float, ...]]:
    n = len(grid.adapters)
    vectors = grid.weights or ((1.0,),)
    return [tuple(v) * n if len(v) == 1 else tuple(v) for v in vectors]


def expand(grid: Grid) -> list[Candidate]:
    """The grid's merge specs in a fixed order (strategy, weights, density, seed), deduplicated."""
    out: dict[str, Candidate] = {}
    for name in grid.strategies:
        strategy = Strategy(name)
        densities = grid.densities if strategy.uses_density else (None,)
        seeds = grid.seeds if strategy.uses_seed else (None,)
        for weights in weight_vectors(grid):
            for density in densities:
                for seed in seeds:
                    spec: dict[str, Any] = {
                        "ids": list(grid.adapters),
                        "weights": list(weights),
                        "merge_strategy": name,
                    }
                    if density is not None:
                        spec["density"] = density
                    if seed is not None:
                        spec["seed"] = seed
                    if grid.svd_rank is not None and strategy.in_delta_space:
                        spec["svd_rank"] = grid.svd_rank
                    c = Candidate("merge", spec_label(spec), spec=spec)
                    out.setdefault(c.key, c)
    return list(out.values())


def references(adapters: Iterable[str]) -> list[Candidate]:
    """The base model and each adapter alone: what a merge is judged against."""
    return [Candidate("base", "base")] + [
        Candidate("adapter", adapter_id, adapter_id=adapter_id) for adapter_id in adapters
    ]


def spec_label(spec: Mapping[str, Any]) -> str:
    """A short label for tables and plots: ``ties w=1,0.5 d=0.5 s=1``."""
    parts = [str(spec.get("merge_strategy", "linear"))]
    weights = spec.get("weights") or []
    if weights and any(float(w) != 1.0 for w in weights):
        parts.append("w=" + ",".join(f"{float(w):g}" for w in weights))
    if spec.get("density") is not None:
        parts.append(f"d={float(spec['density']):g}")
    if spec.get("seed") is not None:
        parts.append(f"s={spec['seed']}")
    if spec.get("svd_rank") is not None:
        parts.append(f"r={spec['svd_rank']}")
    return " ".join(parts)


def load_grid_file(path: Path | str) -> dict[str, Any]:
    """A grid written as YAML or JSON (JSON is YAML): the keys of ``GRID_FIELDS``."""
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, Mapping):
        raise InvalidArgument(f"{path}: a grid file is a mapping with keys {list(GRID_FIELDS)}")
    unknown = sorted(set(data) - set(GRID_FIELDS))
    if unknown:
        raise InvalidArgument(f"{path}: unknown key(s) {unknown}; known: {list(GRID_FIELDS)}")
    return dict(data)


def make_grid(values: Mapping[str, Any]) -> Grid:
    """A Grid from loosely typed values (a grid file, or the flags): lists or comma strings."""

    def items(name: str, kind: type, default: Sequence[Any] = ()) -> tuple:
        raw = values.get(name)
        if raw is None:
            return tuple(default)
        if isinstance(raw, str):
            raw = [x for x in raw.split(",") if x.strip()]
        elif not isinstance(raw, list | tuple):
            raw = [raw]
        try:
            return tuple(kind(x.strip() if isinstance(x, str) else x) for x in raw)
        except (TypeError, ValueError) as err:
            raise InvalidArgument(f"sweep {name}: {err}") from None

    weights = []
    for w in values.get("weights") or []:
        vector = w.split(",") if isinstance(w, str) else (w if isinstance(w, list) else [w])
        try:
            weights.append(tuple(float(x) for x in vector))
        except (TypeError, ValueError) as err:
            raise InvalidArgument(f"sweep weights: {err}") from None
    svd_rank = values.get("svd_rank")
    return Grid(
        adapters=items("adapters", str),
        strategies=items("strategies", lambda s: str(s).lower(), DEFAULT_STRATEGIES),
        densities=items("densities", float, DEFAULT_DENSITIES),
        weights=tuple(weights),
        seeds=items("seeds", int, (0,)),
        svd_rank=None if svd_rank is None else int(svd_rank),
    )
