"""Merging LoRA adapters: the contract is in ``contract``; ``merge_adapters`` is the entry."""

from hotmerge_kernels.merge.contract import (
    MergeCancelled,
    MergeResult,
    merge_adapters,
    trim_thresholds,
)

__all__ = ["MergeCancelled", "MergeResult", "merge_adapters", "trim_thresholds"]
