"""serve_load's stall trace: what it wraps it times and gives back; the summary names the
slowest events with their times since the level began."""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from serve_clients import Sample  # noqa: E402
from serve_trace import StallTrace  # noqa: E402


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

    def _write_adapters(self, admission):
        self.calls.append(admission)
        deadline = time.thread_time() + 0.003  # 3 ms on the CPU, then 3 ms asleep
        while time.thread_time() < deadline:
            pass
        time.sleep(0.003)


def test_the_trace_times_steps_and_admissions_and_puts_them_back():
    worker = FakeWorker()
    step, admit, write = worker._step, worker._admit, worker._write_adapters
    trace = StallTrace(worker)
    with trace:
        for _ in range(4):
            assert worker._admit() is True
            worker._step()
        gc.collect()
    assert (worker._step, worker._admit, worker._write_adapters) == (step, admit, write)
    assert worker.calls == ["admit", "writes", "step"] * 4
    assert len(trace.steps) == 4 and len(trace.admissions) == 4 and len(trace.slot_writes) == 4
    sent = trace.t0 + 0.5
    samples = [Sample("single", ttft, ttft, 0.0, 1, [sent + ttft / 1000]) for ttft in (5.0, 50.0)]
    summary = trace.summary(samples, slowest=2)
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
