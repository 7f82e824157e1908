"""The parameters of one merge, as the merge engine takes them (already validated)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Strategy(enum.Enum):
    LINEAR = "linear"
    MAGNITUDE_PRUNE = "magnitude_prune"
    TIES = "ties"
    DARE_LINEAR = "dare_linear"
    DARE_TIES = "dare_ties"
    CAT = "cat"
    SLERP = "slerp"

    @property
    def uses_density(self) -> bool:
        return self in (
            Strategy.MAGNITUDE_PRUNE,
            Strategy.TIES,
            Strategy.DARE_LINEAR,
            Strategy.DARE_TIES,
        )

    @property
    def uses_sign_method(self) -> bool:
        return self in (Strategy.TIES, Strategy.DARE_TIES)

    @property
    def uses_seed(self) -> bool:
        return self in (Strategy.DARE_LINEAR, Strategy.DARE_TIES)

    @property
    def needs_equal_ranks(self) -> bool:
        return self is not Strategy.CAT


class SignMethod(enum.Enum):
    TOTAL = "total"
    FREQUENCY = "frequency"


@dataclass(frozen=True)
class MergeParams:
    strategy: Strategy
    weights: tuple[float, ...]  # one per adapter, LoRA scaling not yet folded in
    density: float = 1.0
    sign_method: SignMethod = SignMethod.TOTAL
    seed: int = 0
