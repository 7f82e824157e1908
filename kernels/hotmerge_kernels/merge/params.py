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
    # ΔW space (PEFT's names): combine ΔWᵢ = sᵢ·Bᵢ·Aᵢ element-wise, then factorise to rank r.
    SVD = "svd"
    TIES_SVD = "ties_svd"
    DARE_LINEAR_SVD = "dare_linear_svd"
    DARE_TIES_SVD = "dare_ties_svd"
    MAGNITUDE_PRUNE_SVD = "magnitude_prune_svd"

    @property
    def in_delta_space(self) -> bool:
        return self in _ELEMENTWISE_OF

    @property
    def elementwise(self) -> Strategy:
        """The element-wise combination: itself, or the one a ΔW-space strategy applies to ΔW."""
        return _ELEMENTWISE_OF.get(self, self)

    @property
    def uses_density(self) -> bool:
        return self.elementwise in (
            Strategy.MAGNITUDE_PRUNE,
            Strategy.TIES,
            Strategy.DARE_LINEAR,
            Strategy.DARE_TIES,
        )

    @property
    def uses_sign_method(self) -> bool:
        return self.elementwise in (Strategy.TIES, Strategy.DARE_TIES)

    @property
    def uses_seed(self) -> bool:
        return self.elementwise in (Strategy.DARE_LINEAR, Strategy.DARE_TIES)

    @property
    def needs_equal_ranks(self) -> bool:
        """Factor-space element-wise merges need one rank; cat and ΔW-space merges do not."""
        return self is not Strategy.CAT and not self.in_delta_space


_ELEMENTWISE_OF = {
    Strategy.SVD: Strategy.LINEAR,
    Strategy.TIES_SVD: Strategy.TIES,
    Strategy.DARE_LINEAR_SVD: Strategy.DARE_LINEAR,
    Strategy.DARE_TIES_SVD: Strategy.DARE_TIES,
    Strategy.MAGNITUDE_PRUNE_SVD: Strategy.MAGNITUDE_PRUNE,
}


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
    svd_rank: int | None = None  # ΔW-space only: output rank (None: the largest input rank)
    svd_clamp: float | None = None  # ΔW-space only: quantile clamp of the factors (PEFT's)
