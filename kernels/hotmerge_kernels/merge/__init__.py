"""Merging LoRA adapters: ``merge_adapters`` is the entry, its contract is ``contract``'s
docstring; the torch twins of the kernels are in ``reference``."""

from hotmerge_kernels.merge.contract import (
    MergeCancelled,
    MergeResult,
    merge_adapters,
    trim_thresholds,
)

__all__ = ["MergeCancelled", "MergeResult", "merge_adapters", "trim_thresholds"]
