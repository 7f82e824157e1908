"""Prometheus metrics of one server, in a registry of its own.

Each ``Metrics`` owns a ``CollectorRegistry``, so tests and several servers in one process do
not collide on the global one; ``start_http(port)`` serves it at ``/metrics`` on its own port.
Every name starts with ``hotmerge_``; times are in seconds, sizes in bytes (Prometheus
conventions). The instruments are public attributes; the methods below cover the common calls.

For LLM-aware balancers (the Kubernetes Gateway API Inference Extension's model-server protocol,
whose endpoint picker reads vLLM-shaped metrics under names it is given): queue size
``hotmerge_queue_depth``, ``hotmerge_num_requests_running``, ``hotmerge_kv_cache_usage_perc``
(0-1) and the info metric ``hotmerge_lora_requests_info{running_lora_adapters,
waiting_lora_adapters, max_lora}`` (value: the scrape time), set up by ``watch_adapters``.

Wiring the merge cache: ``MergeCache(budget, on_event=metrics.merge_cache_event)`` counts its
hits, misses, waits and evictions, and ``metrics.merged_adapter_bytes.set_function(lambda:
cache.used_bytes)`` reads its size at scrape time. The adapter store can do the same with
``cache_event("adapter", event)`` and ``adapter_bytes``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


def _log_buckets(lo_exp: int, hi_exp: int) -> tuple[float, ...]:
    """1, 2.5, 5 per decade from 10**lo_exp to 10**hi_exp (inclusive)."""
    buckets = [float(f"{m}e{e}") for e in range(lo_exp, hi_exp) for m in (1, 2.5, 5)]
    return (*buckets, float(f"1e{hi_exp}"))


MERGE_BUCKETS = _log_buckets(-5, 1)  # 10 µs .. 10 s
REQUEST_BUCKETS = _log_buckets(-3, 2)  # 1 ms .. 100 s
CACHE_EVENTS = ("hit", "miss", "wait", "evict")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.merge_seconds = Histogram(
            "hotmerge_merge_seconds",
            "Time to merge one spec (merge_fn on a cache miss), by strategy",
            ["strategy"],
            buckets=MERGE_BUCKETS,
            registry=r,
        )
        self.cache_hits = Counter(
            "hotmerge_cache_hits",
            "Lookups that found the entry ready, by cache (merge, adapter)",
            ["cache"],
            registry=r,
        )
        self.cache_misses = Counter(
            "hotmerge_cache_misses",
            "Lookups that had to produce the entry (merges run, adapters loaded), by cache",
            ["cache"],
            registry=r,
        )
        self.cache_waits = Counter(
            "hotmerge_cache_waits",
            "Lookups that waited for another request producing the same entry, by cache",
            ["cache"],
            registry=r,
        )
        self.cache_evictions = Counter(
            "hotmerge_cache_evictions",
            "Entries evicted to make room, by cache",
            ["cache"],
            registry=r,
        )
        self.adapter_bytes = Gauge(
            "hotmerge_adapter_bytes", "Device bytes held by loaded adapters", registry=r
        )
        self.merged_adapter_bytes = Gauge(
            "hotmerge_merged_adapter_bytes",
            "Device bytes held by cached merged adapters",
            registry=r,
        )
        self.adapters_loaded = Gauge(
            "hotmerge_adapters_loaded", "Adapters resident on the device", registry=r
        )
        self.requests = Counter(
            "hotmerge_requests",
            "Finished requests, by gRPC method and status code",
            ["method", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "hotmerge_request_seconds",
            "Time from a request's arrival to its last response, by gRPC method",
            ["method"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "hotmerge_queue_depth", "Requests waiting for a batch slot", registry=r
        )
        self.generated_tokens = Counter(
            "hotmerge_generated_tokens", "Tokens generated, over all requests", registry=r
        )
        self.requests_running = Gauge(
            "hotmerge_num_requests_running", "Requests in the running batch", registry=r
        )
        self.kv_cache_usage = Gauge(
            "hotmerge_kv_cache_usage_perc", "Fraction of the KV cache in use (0-1)", registry=r
        )
        self._cache_children: dict[tuple[str, str], Counter] = {}

    def watch_adapters(
        self, adapter_names: Callable[[], tuple[list[str], list[str]]], max_lora: int
    ) -> None:
        """Serve ``hotmerge_lora_requests_info``: ``adapter_names()`` gives (running, waiting)
        adapter names at scrape time; ``max_lora`` is how many adapters one batch can hold."""
        self.registry.register(_LoraInfo(adapter_names, max_lora))

    def watch_prefix_cache(self, counts: Callable[[], tuple[int, int]]) -> None:
        """Serve ``hotmerge_prefix_cache_queries_total`` and ``..._hits_total`` (prompt
        tokens looked up in the KV prefix cache and found there; vLLM's pair):
        ``counts()`` gives (queries, hits) at scrape time, e.g. the block manager's."""
        self.registry.register(_PrefixCache(counts))

    # -- observations ----------------------------------------------------------------------

    def observe_merge(self, strategy: str, seconds: float) -> None:
        self.merge_seconds.labels(strategy=strategy).observe(seconds)

    def cache_event(self, cache: str, event: str) -> None:
        """Count one cache event: hit, miss, wait or evict (others, e.g. failure, are ignored)."""
        child = self._cache_children.get((cache, event))
        if child is None:  # labels() is slow for a per-request path: keep the children
            counter = {
                "hit": self.cache_hits,
                "miss": self.cache_misses,
                "wait": self.cache_waits,
                "evict": self.cache_evictions,
            }.get(event)
            if counter is None:
                return
            child = self._cache_children[(cache, event)] = counter.labels(cache=cache)
        child.inc()

    def merge_cache_event(self, event: str) -> None:
        """``MergeCache``'s ``on_event`` callback."""
        self.cache_event("merge", event)

    def observe_request(
        self, method: str, code: grpc.StatusCode | str, seconds: float, tokens: int = 0
    ) -> None:
        """One finished request: its method (e.g. ``Generate``), status, duration and tokens."""
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        self.requests.labels(method=method, code=name).inc()
        self.request_seconds.labels(method=method).observe(seconds)
        if tokens:
            self.generated_tokens.inc(tokens)

    # -- exposition ------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in Prometheus text format (what ``/metrics`` serves)."""
        return generate_latest(self.registry)


class _LoraInfo:
    """The vLLM-format LoRA info metric (one sample whose labels list the adapters)."""

    def __init__(self, adapter_names: Callable[[], tuple[list[str], list[str]]], max_lora: int):
        self.adapter_names = adapter_names
        self.max_lora = max_lora

    def describe(self):
        return []  # labels change at every scrape: nothing to check at registration

    def collect(self):
        running, waiting = self.adapter_names()
        family = GaugeMetricFamily(
            "hotmerge_lora_requests_info",
            "Adapters of running and waiting requests (labels); value: when it was read",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        family.add_metric([",".join(running), ",".join(waiting), str(self.max_lora)], time.time())
        yield family


class _PrefixCache:
    """Prompt tokens looked up in the KV prefix cache and found there, read at scrape time."""

    def __init__(self, counts: Callable[[], tuple[int, int]]):
        self.counts = counts

    def describe(self):
        return []

    def collect(self):
        queries, hits = self.counts()
        for name, value, what in (
            ("queries", queries, "Prompt tokens looked up in the KV prefix cache"),
            ("hits", hits, "Prompt tokens found in the KV prefix cache (their prefill skipped)"),
        ):
            family = CounterMetricFamily(f"hotmerge_prefix_cache_{name}", what)
            family.add_metric([], value)
            yield family
