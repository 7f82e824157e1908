import grpc
import pytest
import torch
from hotmerge.merging.cache import MergeCache
from hotmerge.metrics import MERGE_BUCKETS, Metrics
from hotmerge_kernels.layout import FlatAdapter
from prometheus_client.parser import text_string_to_metric_families


def samples(metrics: Metrics) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} parsed from the text exposition."""
    text = metrics.exposition().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: Metrics, name: str, **labels) -> float:
    return samples(metrics)[(name, frozenset(labels.items()))]


def adapter(rank=2) -> FlatAdapter:
    tensors = {("m", "A"): torch.zeros(rank, 4), ("m", "B"): torch.zeros(4, rank)}
    return FlatAdapter.from_tensors(tensors, rank=rank, scaling=1.0)


def test_every_name_has_the_prefix_and_registries_are_separate():
    a, b = Metrics(), Metrics()  # no "Duplicated timeseries" error: each has its own registry
    a.generated_tokens.inc(5)
    names = {name for name, _ in samples(a)}
    assert names and all(n.startswith("hotmerge_") for n in names)
    assert value(a, "hotmerge_generated_tokens_total") == 5
    assert value(b, "hotmerge_generated_tokens_total") == 0


def test_merge_latency_histogram_by_strategy():
    m = Metrics()
    assert MERGE_BUCKETS[0] == pytest.approx(1e-5) and MERGE_BUCKETS[-1] == pytest.approx(10)
    m.observe_merge("ties", 0.0003)
    m.observe_merge("ties", 2.0)
    m.observe_merge("linear", 0.00002)
    assert value(m, "hotmerge_merge_seconds_count", strategy="ties") == 2
    assert value(m, "hotmerge_merge_seconds_sum", strategy="ties") == pytest.approx(2.0003)
    assert value(m, "hotmerge_merge_seconds_bucket", strategy="ties", le="0.0005") == 1
    assert value(m, "hotmerge_merge_seconds_bucket", strategy="linear", le="2.5e-05") == 1
    assert value(m, "hotmerge_merge_seconds_bucket", strategy="linear", le="1e-05") == 0


def test_merge_cache_events_and_bytes():
    m = Metrics()
    cache = MergeCache(2 * adapter().nbytes, on_event=m.merge_cache_event)
    m.merged_adapter_bytes.set_function(lambda: cache.used_bytes)
    for key in ("a", "a", "b", "c"):  # miss, hit, miss, miss + evict a
        cache.get_or_merge(key, adapter)
    assert value(m, "hotmerge_cache_misses_total", cache="merge") == 3
    assert value(m, "hotmerge_cache_hits_total", cache="merge") == 1
    assert value(m, "hotmerge_cache_evictions_total", cache="merge") == 1
    assert value(m, "hotmerge_merged_adapter_bytes") == cache.used_bytes == 2 * adapter().nbytes
    m.cache_event("adapter", "wait")
    m.cache_event("adapter", "failure")  # not a counter; ignored
    assert value(m, "hotmerge_cache_waits_total", cache="adapter") == 1


def test_requests_queue_and_store_gauges():
    m = Metrics()
    m.observe_request("Generate", grpc.StatusCode.OK, 0.2, tokens=7)
    m.observe_request("Generate", grpc.StatusCode.OK, 0.3, tokens=3)
    m.observe_request("Merge", "INVALID_ARGUMENT", 0.001)
    m.queue_depth.set(4)
    m.adapters_loaded.set(2)
    m.adapter_bytes.set(12345)
    assert value(m, "hotmerge_requests_total", method="Generate", code="OK") == 2
    assert value(m, "hotmerge_requests_total", method="Merge", code="INVALID_ARGUMENT") == 1
    assert value(m, "hotmerge_request_seconds_count", method="Generate") == 2
    assert value(m, "hotmerge_request_seconds_bucket", method="Generate", le="0.25") == 1
    assert value(m, "hotmerge_generated_tokens_total") == 10
    assert value(m, "hotmerge_queue_depth") == 4
    assert value(m, "hotmerge_adapters_loaded") == 2
    assert value(m, "hotmerge_adapter_bytes") == 12345


def test_balancer_gauges_and_lora_info():
    m = Metrics()
    adapters = {"now": (["ad-a", "m-123"], ["ad-b"])}
    m.watch_adapters(lambda: adapters["now"], max_lora=8)
    m.requests_running.set(3)
    m.kv_cache_usage.set(0.25)
    assert value(m, "hotmerge_num_requests_running") == 3
    assert value(m, "hotmerge_kv_cache_usage_perc") == 0.25
    info = {k: v for k, v in samples(m).items() if k[0] == "hotmerge_lora_requests_info"}
    ((_, labels),) = info
    assert dict(labels) == {
        "running_lora_adapters": "ad-a,m-123",
        "waiting_lora_adapters": "ad-b",
        "max_lora": "8",
    }
    assert info[("hotmerge_lora_requests_info", labels)] > 1.7e9  # a timestamp: the newest wins
    adapters["now"] = ([], [])  # read at scrape time
    labels = dict(next(k[1] for k in samples(m) if k[0] == "hotmerge_lora_requests_info"))
    assert labels["running_lora_adapters"] == "" and labels["waiting_lora_adapters"] == ""


def test_prefix_cache_counters_read_the_block_manager_at_scrape_time():
    from hotmerge.engine.block_manager import BlockManager

    metrics, pool = Metrics(), BlockManager(16, 4)
    metrics.watch_prefix_cache(lambda: (pool.queries, pool.hits))
    assert value(metrics, "hotmerge_prefix_cache_queries_total") == 0
    prompt = list(range(9))
    first = pool.allocate(prompt)
    pool.commit(first, prompt, len(prompt))
    pool.allocate(prompt)
    assert value(metrics, "hotmerge_prefix_cache_queries_total") == 18
    assert value(metrics, "hotmerge_prefix_cache_hits_total") == 8
