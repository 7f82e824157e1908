"""serve_load's stall trace: what it wraps it times and gives back; the summary names the
slowest events with their times since the level began."""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from serve_clients import Sample  # noqa: E402
from serve_report import load_lines  # noqa: E402
from serve_trace import DeviceTimeline, StallTrace  # noqa: E402


class FakeWorker:
    def __init__(self) -> None:
        self.calls = []

    def _step(self):
        self.calls.append("step")
        time.sleep(0.002 * len(self.calls))  # each step slower than the last

    def _admit(self):
        self.calls.append("admit")
        self._write_adapters("writes")
        return True

    def _launch(self, lap):
        self.calls.append("launch")
        return None

    def _write_adapters(self, admission):
        self.calls.append(admission)
        deadline = time.thread_time() + 0.003  # 3 ms on the CPU, then 3 ms asleep
        while time.thread_time() < deadline:
            pass
        time.sleep(0.003)


def test_the_trace_times_steps_and_admissions_and_puts_them_back():
    worker = FakeWorker()
    step, admit, write, launch = (worker._step, worker._admit, worker._write_adapters,
                                  worker._launch)  # fmt: skip
    trace = StallTrace(worker, timeline=DeviceTimeline(HostEvent))
    with trace:
        for _ in range(4):
            assert worker._admit() is True
            worker._step()
        gc.collect()
    assert (worker._step, worker._admit, worker._write_adapters, worker._launch) == (
        step,
        admit,
        write,
        launch,
    )
    assert worker.calls == ["admit", "writes", "step"] * 4
    assert len(trace.steps) == 4 and len(trace.admissions) == 4 and len(trace.slot_writes) == 4
    sent = trace.t0 + 0.5
    samples = [Sample("single", ttft, ttft, 0.0, 1, [sent + ttft / 1000]) for ttft in (5.0, 50.0)]
    summary = trace.summary(samples, slowest=2)
    assert summary["device"] is None  # nothing was launched
    slowest = [s["ms"] for s in summary["slowest_steps"]]
    assert slowest == sorted(slowest, reverse=True) and slowest[0] >= 8.0  # the 4th: 8 ms sleep
    assert all(0 <= s["at_s"] < 5 for s in summary["slowest_steps"])
    assert [s["ttft_ms"] for s in summary["slowest_ttft"]] == [50.0, 5.0]
    assert all(abs(s["sent_at_s"] - 0.5) < 1e-6 for s in summary["slowest_ttft"])
    assert summary["gc"]["gen2"]["count"] >= 1
    for write in summary["slowest_slot_writes"]:  # wall: CPU and sleep; CPU: the spin alone
        assert write["ms"] >= 6.0 and 3.0 <= write["cpu_ms"] < write["ms"] - 2.0
    assert all(s["cpu_ms"] < 2.0 for s in summary["slowest_steps"])  # the steps only sleep


def test_the_trace_times_triton_compiles_and_puts_the_hooks_back():
    """Triton calls ``jit_cache_hook`` before compiling a new specialization and
    ``jit_post_compile_hook`` after (``JITFunction._do_compile``); the trace times what lies
    between, lets the compile go on (returns None) and restores the hooks."""
    from types import SimpleNamespace

    from triton import knobs

    before = (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook)
    trace = StallTrace(FakeWorker())
    with trace:
        for name, seconds in (("fast_kernel", 0.001), ("slow_kernel", 0.02)):
            fn = SimpleNamespace(name=name)
            assert knobs.runtime.jit_cache_hook(key=name, fn=fn, repr="", compile={}) is None
            time.sleep(seconds)
            knobs.runtime.jit_post_compile_hook(key=name, fn=fn, repr="", compile={})
    assert (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook) == before
    compiles = trace.summary([])["jit_compiles"]
    assert compiles["count"] == 2
    assert [c["kernel"] for c in compiles["slowest"]] == ["slow_kernel", "fast_kernel"]
    assert compiles["slowest"][0]["ms"] >= 20.0 and compiles["total_ms"] >= 21.0


class HostEvent:
    """A CUDA event's surface on the host clock: the stream "reaches" it when recorded."""

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, other) -> float:
        return 1000 * (other.t - self.t)

    def synchronize(self):
        pass


def test_the_device_timeline_splits_decode_and_mixed_steps_and_the_gaps_between():
    from types import SimpleNamespace as NS

    plans = [  # (decode rows, prompt tokens of each chunk, decode rows as one-token chunks)
        NS(decode=[0] * 3, chunks=[], decode_chunks=0),
        NS(decode=[0] * 5, chunks=[], decode_chunks=0),
        NS(decode=[], chunks=[[1], [1], list(range(100))], decode_chunks=2),
        None,  # nothing scheduled: no span
        NS(decode=[], chunks=[list(range(20))], decode_chunks=0),
    ]
    for plan in plans:
        if plan is not None:
            plan.chunks = [NS(token_ids=c) for c in plan.chunks]
    work = iter([0.004, 0.004, 0.012, 0.0, 0.006])

    def launch(lap):
        time.sleep(next(work))  # the "device" runs while the host launches
        plan = plans.pop(0)
        return None if plan is None else (plan, "its sampling")

    timeline = DeviceTimeline(HostEvent)
    timed = timeline.wrap(launch)
    marks = []
    for _ in range(5):
        marks.append(time.perf_counter())
        timed(None)
        time.sleep(0.003)  # the host between two steps: a gap on the device
    summary = timeline.summary()
    assert len(timeline.device_ms()) == 4  # the launch that found nothing to do has no span
    late = timeline.device_ms(since=marks[2])  # the 12 ms mixed step and the last decode
    assert len(late) == 2 and late[0] >= 12.0 and 4.0 <= late[1] < 12.0
    assert timeline.device_ms(marks[1], marks[2]) == timeline.device_ms()[1:2]
    decode = summary["decode_steps_by_rows"]
    assert list(decode) == ["2-3", "4-7"] and all(g["steps"] == 1 for g in decode.values())
    assert all(4.0 <= g["ms_mean"] < 8.0 for g in decode.values())
    mixed = summary["mixed_steps_by_prompt_tokens"]
    assert list(mixed) == ["16-31", "64-127"]
    assert mixed["64-127"]["prompt_tokens_mean"] == 100 and mixed["64-127"]["rows_mean"] == 2
    assert mixed["16-31"]["rows_mean"] == 0 and mixed["64-127"]["ms_mean"] >= 12.0
    assert summary["gap_ms_total"] >= 3 * 3.0  # three gaps between four spans (and one skipped)
    assert 0.0 < summary["busy_share"] < 1.0
    line = "\n".join(load_lines(_load_with(summary)))
    assert "busy" in line and "64-127 tokens 1x" in line and "2-3 rows 1x" in line


def _load_with(device: dict) -> dict:
    """A load level's result with nothing but the device timeline worth reading."""
    kinds = dict.fromkeys(
        ("ttft_ms_p50", "ttft_ms_p99", "total_ms_p50", "total_ms_p99", "itl_ms_p50",
         "itl_ms_p99", "merge_share_of_ttft_p50", "queue_ms_p50", "merge_ms_p50",
         "prefill_ms_p50"), 1.0)  # fmt: skip
    engine = dict.fromkeys(("steps", "prefills", "decodes", "mixed_steps", "preemptions"), 1)
    engine |= {"step_ms_p50": 1.0, "step_ms_p99": 1.0, "engine_busy_share": 1.0,
               "decode_batch_sizes": {}, "phase_ms_per_step": {}}  # fmt: skip
    stalls = {"slowest_steps": [], "slowest_admissions": [], "slowest_ttft": [], "gc": {},
              "device": device}  # fmt: skip
    return {"concurrency": 1, "requests": 1, "max_batch_size": 1, "mix": {},
            "max_new_tokens": 1, "requests_per_s": 1.0, "tokens_per_s": 1.0,
            "tokens_per_s_full": 1.0, "engine": engine, "itl": {"itl_ms_p50": 1.0,
            "itl_ms_p99": 1.0, "tokens": 1}, "by_kind": {"single": kinds | {"count": 1}},
            "stalls": stalls}  # fmt: skip


def test_the_timeline_wraps_a_real_engine_worker(tmp_path):
    """The timeline reads what the worker's launch really returns (plan and sampling), on a
    tiny engine with host-clock events."""
    from hotmerge.generation import GenerationRequest, SamplingParams

    from tests.helpers import make_engine, tiny_llama

    engine = make_engine(tiny_llama(tmp_path), tmp_path / "adapters", batch_wait_ms=20)
    try:
        trace = StallTrace(engine._worker, timeline=DeviceTimeline(HostEvent))
        with trace:
            handles = [
                engine.submit(GenerationRequest(f"prompt {i}", SamplingParams(max_new_tokens=6)))
                for i in range(3)
            ]
            assert all(h.wait().generated_tokens == 6 for h in handles)
        device = trace.summary([])["device"]
        decoded = sum(g["steps"] for g in device["decode_steps_by_rows"].values())
        prefilled = sum(g["steps"] for g in device["mixed_steps_by_prompt_tokens"].values())
        assert decoded >= 5 and prefilled >= 1 and device["span_ms"] > 0
    finally:
        engine.stop()


def test_ttft_after_the_opening_burst_leaves_out_the_first_requests_sent():
    """The first ``concurrency`` requests sent (at once, when a level starts) are left out, by
    when they were sent, not by when they finished; the report prints the figure."""
    from serve_report import ttft_after_burst

    def sample(sent_s: float, ttft_ms: float) -> Sample:
        first = sent_s + ttft_ms / 1000
        return Sample("single", ttft_ms, ttft_ms + 5, 0.0, 2, [first, first + 0.005])

    burst = [sample(0.0, 200.0 + i) for i in range(4)]  # queued behind each other
    later = [sample(1.0 + i, 20.0 + i) for i in range(6)]
    after = ttft_after_burst(later[:3] + burst + later[3:], concurrency=4)
    assert after["requests"] == 6
    assert 20.0 <= after["ttft_ms_p50"] <= after["ttft_ms_p99"] <= 25.0
    load = _load_with({}) | {"ttft_after_burst": after}
    assert "sent after the opening burst" in "\n".join(load_lines(load))
    assert ttft_after_burst(burst, concurrency=4)["ttft_ms_p50"] is None


def test_the_report_gives_the_prefix_split_and_the_merge_path_profile(tmp_path):
    from serve_report import write_results

    result = {
        "device": "cpu", "date": "2026-12-08T00:00:00", "tag": "-t", "model": "m",
        "adapters": 2, "rank": 4, "versions": {}, "loads": [], "merge_during_streams": None,
        "hit_overhead": {"merge_hit_us": 17.0, "named_adapter_us": 6.0, "hit_adds_us": 11.0},
        "cold_ties": {"cold_ties_merge_ms_p50": 1.5, "cold_ties_ttft_ms_p50": 18.0,
                      "cold_ties_merge_share_of_ttft_p50": 1.5 / 18, "named_ttft_ms_p50": 15.0},
        "shared_prefix": {
            "prefix_tokens": 512, "suffix_tokens": 16, "runs": 3, "uncached_ttft_ms_p50": 30.0,
            "cached_ttft_ms_p50": 14.5, "ratio": 14.5 / 30, "uncached_queue_ms_p50": 3.25,
            "uncached_prefill_ms_p50": 23.5, "cached_queue_ms_p50": 3.125,
            "cached_prefill_ms_p50": 8.75,
            "cached_steps": {"engine_ms_per_request": 7.5, "engine_cpu_ms_per_request": 1.25,
                             "device_ms_per_request": 6.5},
            "uncached_steps": {"engine_ms_per_request": 22.0, "engine_cpu_ms_per_request": 1.5,
                               "device_ms_per_request": None},
        },
        "merge_path_profile": {"runs": 20, "acquire_ms_p50": 1.94, "merge_ms_p50": 1.57,
                               "table": "t.txt"},
    }  # fmt: skip
    text = write_results(result, tmp_path).with_suffix(".md").read_text()
    assert "server queue / prefill p50 3.12 / 8.75 ms cached, 3.25 / 23.50 ms uncached" in text
    assert (
        "cached, a request's engine steps: 7.50 ms on the engine thread (1.25 ms CPU), 6.50" in text
    )
    assert (
        "uncached, a request's engine steps: 22.00 ms on the engine thread (1.50 ms CPU), no"
        in text
    )
    assert "(idle engine, 20 runs): 1.94 ms, of which the merge itself 1.57 ms" in text


def test_step_split_takes_the_steps_of_its_window():
    from types import SimpleNamespace

    from serve_probes import step_split

    steps = [(t, (10 + t) / 1000, 0.002) for t in range(10)]  # begun at t s, 10 + t ms
    split = step_split(SimpleNamespace(steps=steps, timeline=None), since=5, until=8)
    assert split["steps"] == 3  # begun at 5, 6 and 7
    assert round(split["step_ms_p50"], 6) == 16.0 and round(split["step_ms_p99"], 6) == 17.0
    assert round(split["step_cpu_ms_p99"], 6) == 2.0 and split["step_device_ms_p50"] is None
    assert step_split(SimpleNamespace(steps=steps, timeline=None), since=10)["steps"] == 0
