"""From an inline merge spec to a merged adapter on the device, pinned for one request.

The path of a spec: its input adapters are taken from the adapter store (loaded if they are
not resident, and pinned while they are needed), checked for compatibility, and the spec's cache
key is computed from their content revisions. The merge cache then gives the merged adapter
(a hit), or merges it once however many requests ask at the same moment (a miss). The result
is an ``AdapterLease`` that keeps the merged adapter pinned in the cache until the request ends.

A spec of one adapter at weight 1 that leaves it unchanged (``merge_spec.is_identity``) is
served as that adapter: no merge, nothing cached.

Bounds: every wait (adapter room, merge room, another request's merge of the same key) ends by
the request's deadline and the stores' server maximum; inputs that together exceed the adapter
budget fail at once (no retry can help); a running merge stops between chunks when the request's
deadline passes, its client goes away or the server stops (``stop``); a merged adapter that is
not finite (weights too large for the dtype) is refused.

Off the engine's path: on CUDA, merges run on streams of their own and never queue behind a
decode step (inputs are complete when loaded, or carry a ``ready_event``). A factor-space merge
(a few hundred microseconds of kernels) runs at the engine's priority: at the lowest, with a
step always queued on the engine's stream, its kernels get only the SMs a step leaves over (on
the H100 at concurrency 32 a cold TIES merge took 10.9 ms of its request's time, 2.35 ms on an
idle server), while its request waits. A ΔW-space merge (hundreds of milliseconds) runs at
CUDA's lowest priority, so decode's kernels go first. Between the
chunks of a ΔW-space merge (hundreds of milliseconds of work; the polls after each module
group's factorisation) the merge thread waits for its stream, with the GIL released, and
yields the GIL: at most one chunk of merge work is queued ahead of decode, the engine thread
never waits on the merge's host code for long, and a cancelled merge stops within a chunk. The
merged adapter carries a ``ready_event`` recorded after its last write; the adapter pool's
slot write waits on it on the engine's stream.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from hotmerge_kernels.layout import FlatAdapter
from hotmerge_kernels.merge import MergeCancelled, merge_adapters
from hotmerge_kernels.merge.params import Strategy

from hotmerge.adapters.store import AdapterStore, LoadedAdapter
from hotmerge.engine import AdapterLease
from hotmerge.engine.worker import ENGINE_STREAM_PRIORITY
from hotmerge.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from hotmerge.merging.cache import MergeCache
from hotmerge.merging.spec import MergeSpec, affinity_key, is_identity, merge_key
from hotmerge.metrics import Metrics

log = logging.getLogger(__name__)

YIELD_EVERY_S = 0.002  # a ΔW-space merge hands the GIL over at most this often
# CUDA stream priorities (lower runs first): a factor-space merge at the engine's, a ΔW-space
# merge at the lowest (0, the default).
SHORT_MERGE_PRIORITY = ENGINE_STREAM_PRIORITY
LONG_MERGE_PRIORITY = 0


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
        max_rank: int | None = None,
        check_adapter: Callable[[FlatAdapter], str | None] | None = None,
    ) -> None:
        self.store = store
        self.cache = cache
        self.dtype = dtype  # part of the key: the same spec merged in another dtype differs
        self.metrics = metrics
        # What the engine can serve: the widest rank (--max-lora-rank) and its check of a
        # merged adapter (None: why it fits). Merges it would refuse are refused before caching.
        self.max_rank = max_rank
        self.check_adapter = check_adapter
        self._stopping = threading.Event()
        self._streams: dict[tuple[torch.device, int], torch.cuda.Stream] = {}
        self._streams_lock = threading.Lock()

    def stop(self) -> None:
        """Stop running merges at their next chunk (shutdown); new merges fail UNAVAILABLE."""
        self._stopping.set()

    def acquire(
        self,
        spec: MergeSpec,
        *,
        deadline: float | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> tuple[AdapterLease, MergeOutcome]:
        """The merged adapter of ``spec``, pinned until the lease is released.

        ``deadline`` (``time.monotonic()``) bounds every wait and the merge itself;
        ``cancelled()`` True (the client went away) stops the merge too."""
        hit = self._cached(spec)
        if hit is not None:
            return hit
        if self._stopping.is_set():
            raise Unavailable("the server is shutting down; retry on another replica")
        self._check_inputs_fit(spec)
        inputs: list[LoadedAdapter] = []
        load_ms = 0.0
        try:
            for adapter_id in spec.adapter_ids:
                loaded, ms = self.store.acquire(adapter_id, deadline=deadline)
                inputs.append(loaded)
                load_ms += ms
            key, affinity = spec_keys(spec, tuple(a.info.revision for a in inputs), self.dtype)
            if is_identity(spec):
                only = inputs.pop()  # stays pinned: the lease releases it
                lease = AdapterLease(
                    only.weights,
                    load_ms,
                    lambda: self.store.release(only.info.id),
                    kv_key=only.info.content_key,
                )
                return lease, self._outcome(key, affinity, True, 0.0, load_ms, only.weights)
            check_compatible(spec, inputs)
            self._check_cat_rank(spec, inputs)
            weights = [a.weights for a in inputs]
            stop = self._stop_check(deadline, cancelled)
            entry, hit, merge_ms = self.cache.acquire(
                key,
                lambda: self._merge(spec, weights, stop, deadline),
                deadline=deadline,
                spec=(spec, affinity),
            )
        finally:
            for loaded in inputs:  # the merged adapter no longer needs its inputs
                self.store.release(loaded.info.id)
        if not hit and self.metrics is not None:
            self.metrics.observe_merge(spec.params.strategy.value, merge_ms / 1000.0)
        lease = AdapterLease(
            entry.adapter, load_ms, lambda: self.cache.release(entry), merge_ms, kv_key=key
        )
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
        lease = AdapterLease(entry.adapter, 0.0, lambda: self.cache.release(entry), kv_key=key)
        return lease, self._outcome(key, affinity, True, 0.0, 0.0, entry.adapter)

    def _check_inputs_fit(self, spec: MergeSpec) -> None:
        """Inputs must be resident together: more than the budget can never work."""
        if len(spec.adapter_ids) < 2:
            return
        needed = sum(self.store.size_of(i) for i in spec.adapter_ids)
        if needed > self.store.budget_bytes:
            raise ResourceExhausted(
                f"merged_adapters: the {len(spec.adapter_ids)} adapters together need {needed} "
                f"bytes resident while they merge, more than the adapter budget of "
                f"{self.store.budget_bytes} bytes; this merge can never run here: merge fewer "
                "adapters or raise the adapter budget (--adapter-budget-mib)"
            )

    def _check_cat_rank(self, spec: MergeSpec, inputs: Sequence[LoadedAdapter]) -> None:
        """cat adds the ranks up: refuse a sum the engine could not serve, before merging."""
        if spec.params.strategy is not Strategy.CAT or self.max_rank is None:
            return
        total = sum(a.info.rank for a in inputs)
        if total > self.max_rank:
            raise InvalidArgument(
                f"merged_adapters: cat adds the ranks up to {total}, more than the server's "
                f"--max-lora-rank {self.max_rank}; merge fewer adapters, or use a ΔW-space "
                "strategy (svd, ties_svd, ...) with svd_rank"
            )

    def _stop_check(
        self, deadline: float | None, cancelled: Callable[[], bool] | None
    ) -> Callable[[], bool]:
        def stop() -> bool:
            return (
                self._stopping.is_set()
                or (deadline is not None and time.monotonic() >= deadline)
                or (cancelled is not None and cancelled())
            )

        return stop

    def _merge(
        self,
        spec: MergeSpec,
        weights: list[FlatAdapter],
        stop: Callable[[], bool],
        deadline: float | None,
    ) -> FlatAdapter:
        long = spec.params.strategy.in_delta_space
        stream = self._stream(
            weights[0].device, LONG_MERGE_PRIORITY if long else SHORT_MERGE_PRIORITY
        )
        for adapter in weights:  # an input written on another stream (a named merge's)
            if stream is not None and adapter.ready_event is not None:
                stream.wait_event(adapter.ready_event)
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                if long:  # let decode through between its chunks
                    stop = _yielding(stop, stream)
                merged = self._merge_on(spec, weights, stop, deadline)  # read back: complete
                if stream is not None:
                    merged.ready_event = stream.record_event()
        except BaseException:
            if stream is not None:  # nothing of a failed merge still runs once it has failed
                stream.synchronize()
            raise
        return merged

    def _merge_on(
        self,
        spec: MergeSpec,
        weights: list[FlatAdapter],
        stop: Callable[[], bool],
        deadline: float | None,
    ) -> FlatAdapter:
        try:
            merged = merge_adapters(weights, spec.params, cancel=stop).adapter
        except ValueError as err:  # inputs the engine cannot merge together
            raise InvalidArgument(f"merged_adapters {list(spec.adapter_ids)}: {err}") from None
        except MergeCancelled:
            if self._stopping.is_set():
                raise Unavailable("the server is shutting down; merge stopped") from None
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("deadline exceeded while merging; merge stopped") from None
            raise Cancelled("cancelled while merging; merge stopped") from None
        if not _finite(merged.buffer):
            raise InvalidArgument(
                f"merged_adapters: the merge overflows {merged.dtype} (values not finite); "
                "use smaller weights"
            )
        reason = self.check_adapter(merged) if self.check_adapter is not None else None
        if reason is not None:  # never cached: the engine would refuse it on every request
            raise InvalidArgument(f"merged_adapters: the merged adapter's {reason}")
        return merged

    def _stream(self, device: torch.device, priority: int) -> torch.cuda.Stream | None:
        """The merges' stream of ``priority`` on ``device`` (None off CUDA). It does not wait
        for the default stream (a fresh merge must not queue behind a decode step there): the
        adapter store's copy to the device is a blocking one, complete when the adapter is
        loaded, and an input made on another stream carries its ``ready_event``."""
        if device.type != "cuda":
            return None
        with self._streams_lock:
            stream = self._streams.get((device, priority))
            if stream is None:
                stream = torch.cuda.Stream(device, priority=priority)
                self._streams[device, priority] = stream
        return stream

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


def _yielding(stop: Callable[[], bool], stream: torch.cuda.Stream | None) -> Callable[[], bool]:
    """``stop``, polled between a merge's chunks, that first lets the engine run: waits for
    the chunk on the device (GIL released; at once when the stream is idle, as at all but the
    first of a group's polls) and yields the GIL at most every ``YIELD_EVERY_S`` (each yield
    can cost the merge thread an engine step's hold of the GIL)."""
    last = -math.inf

    def check() -> bool:
        nonlocal last
        if stream is not None:
            stream.synchronize()
        now = time.monotonic()
        if now - last >= YIELD_EVERY_S:
            last = now
            pause()
        return stop()

    return check


def _finite(buffer: torch.Tensor) -> bool:
    """Whether every value is finite, from one reduction (its least and greatest: NaN and the
    infinities show there). ``torch.isfinite(buffer).all()`` made four passes and two
    buffer-sized temporaries: on the H100, 0.6 ms of a 1.9 ms cold merge went to it, most of it
    allocating device memory."""
    if buffer.numel() == 0:
        return True
    lo, hi = torch.stack(buffer.aminmax()).tolist()
    return math.isfinite(lo) and math.isfinite(hi)


def pause() -> None:
    """Hand the GIL to any other thread that wants it (the engine's)."""
    time.sleep(0)


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
