"""From an inline merge spec to a merged adapter on the device, pinned for one request.

The path of a spec: its input adapters are taken from the adapter store (loaded if they are
not resident, and pinned while they are needed), checked for compatibility, and the spec's cache
key is computed from their content revisions. The merge cache then gives the merged adapter
(a hit), or merges it once however many requests ask at the same moment (a miss). The result
is an ``AdapterLease`` that keeps the merged adapter pinned in the cache until the request ends.

A spec of one adapter at weight 1 that leaves it unchanged (``merge_spec.is_identity``) is
served as that adapter: no merge, nothing cached.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from hotmerge_kernels.layout import FlatAdapter
from hotmerge_kernels.merge import merge_adapters

from hotmerge.adapters import AdapterStore, LoadedAdapter
from hotmerge.engine import AdapterLease
from hotmerge.errors import InvalidArgument
from hotmerge.merge_cache import MergeCache
from hotmerge.merge_spec import MergeSpec, affinity_key, is_identity, merge_key
from hotmerge.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeOutcome:
    """What serving a spec cost and produced; reported in responses, logs and metrics."""

    merge_key: str  # cache key: canonical spec + revisions + dtype
    affinity_key: str  # canonical spec alone: what a balancer hashes on
    cache_hit: bool
    merge_ms: float
    adapter_load_ms: float
    rank: int
    nbytes: int


class Merger:
    """Turns a MergeSpec into a pinned merged adapter, through the store and the merge cache."""

    def __init__(
        self,
        store: AdapterStore,
        cache: MergeCache,
        *,
        dtype: str,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.cache = cache
        self.dtype = dtype  # part of the key: the same spec merged in another dtype differs
        self.metrics = metrics

    def acquire(self, spec: MergeSpec) -> tuple[AdapterLease, MergeOutcome]:
        """The merged adapter of ``spec``, pinned until the lease is released."""
        hit = self._cached(spec)
        if hit is not None:
            return hit
        inputs: list[LoadedAdapter] = []
        load_ms = 0.0
        try:
            for adapter_id in spec.adapter_ids:
                loaded, ms = self.store.acquire(adapter_id)
                inputs.append(loaded)
                load_ms += ms
            key, affinity = spec_keys(spec, tuple(a.info.revision for a in inputs), self.dtype)
            if is_identity(spec):
                only = inputs.pop()  # stays pinned: the lease releases it
                lease = AdapterLease(
                    only.weights, load_ms, lambda: self.store.release(only.info.id)
                )
                return lease, self._outcome(key, affinity, True, 0.0, load_ms, only.weights)
            check_compatible(spec, inputs)
            weights = [a.weights for a in inputs]
            entry, hit, merge_ms = self.cache.acquire(
                key, lambda: self._merge(spec, weights), spec=(spec, affinity)
            )
        finally:
            for loaded in inputs:  # the merged adapter no longer needs its inputs
                self.store.release(loaded.info.id)
        if not hit and self.metrics is not None:
            self.metrics.observe_merge(spec.params.strategy.value, merge_ms / 1000.0)
        lease = AdapterLease(entry.adapter, load_ms, lambda: self.cache.release(entry), merge_ms)
        outcome = self._outcome(key, affinity, hit, merge_ms, load_ms, entry.adapter)
        log.debug("merge %s: hit=%s merge=%.2fms load=%.2fms", key, hit, merge_ms, load_ms)
        return lease, outcome

    def _cached(self, spec: MergeSpec) -> tuple[AdapterLease, MergeOutcome] | None:
        """The fast path of a hit: inputs resident, merged adapter cached; no input is pinned."""
        revisions = self.store.resident_revisions(spec.adapter_ids)
        if revisions is None or is_identity(spec):
            return None
        key, affinity = spec_keys(spec, revisions, self.dtype)
        try:
            entry = self.cache.acquire(key).entry
        except KeyError:
            return None
        lease = AdapterLease(entry.adapter, 0.0, lambda: self.cache.release(entry))
        return lease, self._outcome(key, affinity, True, 0.0, 0.0, entry.adapter)

    def _merge(self, spec: MergeSpec, weights: list[FlatAdapter]) -> FlatAdapter:
        try:
            return merge_adapters(weights, spec.params).adapter
        except ValueError as err:  # inputs the engine cannot merge together
            raise InvalidArgument(f"merged_adapters {list(spec.adapter_ids)}: {err}") from None

    def _outcome(
        self,
        key: str,
        affinity: str,
        hit: bool,
        merge_ms: float,
        load_ms: float,
        adapter: FlatAdapter,
    ) -> MergeOutcome:
        return MergeOutcome(
            merge_key=key,
            affinity_key=affinity,
            cache_hit=hit,
            merge_ms=merge_ms,
            adapter_load_ms=load_ms,
            rank=adapter.rank,
            nbytes=adapter.nbytes,
        )


@functools.lru_cache(maxsize=4096)
def spec_keys(spec: MergeSpec, revisions: tuple[str, ...], dtype: str) -> tuple[str, str]:
    """(cache key, affinity key), memoised: hashing the canonical spec is most of a hit's cost."""
    return merge_key(spec, revisions, dtype), affinity_key(spec)


def check_compatible(spec: MergeSpec, inputs: Sequence[LoadedAdapter]) -> None:
    """Equal ranks unless the strategy concatenates them (cat) or merges in ΔW space (*_svd);
    a clear error otherwise."""
    strategy = spec.params.strategy
    ranks = {a.info.id: a.info.rank for a in inputs}
    if strategy.needs_equal_ranks and len(set(ranks.values())) > 1:
        listed = ", ".join(f"{i} (rank {r})" for i, r in ranks.items())
        raise InvalidArgument(
            f"merged_adapters: {strategy.value} merges element by element and needs adapters of "
            f"one rank, got {listed}; use merge_strategy CAT, which accepts mixed ranks, "
            "a ΔW-space strategy (SVD, TIES_SVD, ...), or choose adapters of the same rank"
        )
