"""The Pareto front over skill scores, and the criterion that picks one candidate.

Every skill score is maximised. A point is on the front when no other point is at least as good
on every skill and better on one; equal points are all on the front.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hotmerge.errors import InvalidArgument


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is at least as good as ``b`` everywhere and better somewhere."""
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(
        x > y for x, y in zip(a, b, strict=True)
    )


def pareto_front(points: Sequence[Sequence[float]]) -> list[bool]:
    """For each point, whether it is on the front (O(n^2): sweeps are hundreds of points)."""
    return [not any(dominates(q, p) for q in points if q is not p) for p in points]


def parse_criterion(text: str) -> dict[str, float] | None:
    """``min`` (None: the minimum skill score) or ``sql=2,python=1`` (a weighted sum)."""
    text = text.strip()
    if text in ("", "min"):
        return None
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            weights[name.strip()] = float(value)
        except ValueError:
            raise InvalidArgument(
                f"criterion {text!r}: give 'min' or weights per skill, e.g. 'sql=2,python=1'"
            ) from None
    return weights


def criterion_value(scores: Mapping[str, float], weights: Mapping[str, float] | None) -> float:
    """The minimum of the scores, or their weighted sum (skills not named weigh 0)."""
    if weights is None:
        return min(scores.values())
    unknown = sorted(set(weights) - set(scores))
    if unknown:
        raise InvalidArgument(
            f"criterion names skill(s) {unknown} that were not scored; scored: {sorted(scores)}"
        )
    return sum(w * scores[name] for name, w in weights.items())


def choose(
    candidates: Sequence[Mapping[str, float]],
    weights: Mapping[str, float] | None = None,
    tie_break: Sequence[float] | None = None,
) -> int | None:
    """Index of the candidate (its skill scores) the criterion rates best; ties go to the
    higher mean score, then the higher ``tie_break`` (e.g. the mean reference
    log-likelihood), then the first. None when there are no candidates."""
    if not candidates:
        return None

    def rank(i: int) -> tuple[float, float, float, int]:
        scores = candidates[i]
        mean = sum(scores.values()) / len(scores)
        extra = tie_break[i] if tie_break is not None else 0.0
        return (criterion_value(scores, weights), mean, extra, -i)

    return max(range(len(candidates)), key=rank)
