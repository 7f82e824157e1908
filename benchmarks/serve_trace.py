"""Where a load level's slow first tokens come from: the engine thread's steps and admissions,
timed on the server, Python's garbage collections and Triton's just-in-time compiles (a kernel
specialization first met under load: compiled, or loaded from the disk cache, on the engine
thread), beside the slowest requests' send times.

Times are ``time.perf_counter()`` (system-wide monotonic on Linux), so the clients' process and
the server's share one clock; every time in the summary is seconds since the level started.
"""

from __future__ import annotations

import gc
import time

from triton import knobs


class StallTrace:
    """While entered: each engine step, admission and admission's slot writes (start, seconds,
    the engine thread's CPU seconds), the step profiled when ``profile`` (a
    ``cProfile.Profile``) is given, each garbage collection (generation, start, seconds) and
    each Triton JIT compile (kernel, start, seconds). The worker's admission runs between steps,
    while the step it launched runs on the device: one longer than that step leaves the device
    idle. Wall time far above CPU time is waiting: for the GIL, a lock or the device."""

    def __init__(self, worker, profile=None) -> None:
        self.worker, self.profile = worker, profile
        self.t0 = 0.0
        self.steps: list[tuple[float, float, float]] = []
        self.admissions: list[tuple[float, float, float]] = []
        self.slot_writes: list[tuple[float, float, float]] = []
        self.collections: list[tuple[int, float, float]] = []
        self.compiles: list[tuple[str, float, float]] = []
        self._gc_start = 0.0
        self._compiling: dict[str, float] = {}

    @property
    def step_seconds(self) -> list[float]:
        return [s for _, s, _ in self.steps]

    def _timed(self, fn, into, profile=None):
        def timed(*args):
            t, cpu = time.perf_counter(), time.thread_time()
            try:
                return profile.runcall(fn, *args) if profile is not None else fn(*args)
            finally:
                into.append((t, time.perf_counter() - t, time.thread_time() - cpu))

        return timed

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            seconds = time.perf_counter() - self._gc_start
            self.collections.append((info["generation"], self._gc_start, seconds))

    def _on_compile(self, *, key, fn, **_) -> None:  # before a compile: None lets it go on
        self._compiling[key] = time.perf_counter()

    def _on_compiled(self, *, key, fn, **_) -> None:
        start = self._compiling.pop(key, None)
        if start is not None:
            self.compiles.append((fn.name, start, time.perf_counter() - start))

    def __enter__(self) -> StallTrace:
        w = self.worker
        self._originals = (w._step, w._admit, w._write_adapters)
        w._step = self._timed(w._step, self.steps, self.profile)
        w._admit = self._timed(w._admit, self.admissions)
        w._write_adapters = self._timed(w._write_adapters, self.slot_writes)
        self.t0 = time.perf_counter()
        gc.callbacks.append(self._on_gc)
        self._hooks = (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook)
        knobs.runtime.jit_cache_hook = self._on_compile
        knobs.runtime.jit_post_compile_hook = self._on_compiled
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._on_gc)
        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = self._hooks
        self.worker._step, self.worker._admit, self.worker._write_adapters = self._originals

    def summary(self, samples, slowest: int = 5) -> dict:
        """The slowest steps, admissions and requests (by TTFT) with when they began, the
        collections per generation and the JIT compiles: the pattern tells a one-time stall
        from a steady tail."""

        def top(events):
            worst = sorted(events, key=lambda e: e[1], reverse=True)[:slowest]
            return [
                {
                    "at_s": round(t - self.t0, 3),
                    "ms": round(1000 * s, 2),
                    "cpu_ms": round(1000 * c, 2),
                }
                for t, s, c in worst
            ]

        slow = sorted(samples, key=lambda s: s.ttft_ms, reverse=True)[:slowest]
        by_gen = {}
        for gen, _, seconds in self.collections:
            count, total, worst = by_gen.get(gen, (0, 0.0, 0.0))
            by_gen[gen] = (count + 1, total + seconds, max(worst, seconds))
        return {
            "slowest_steps": top(self.steps),
            "slowest_admissions": top(self.admissions),
            "slowest_slot_writes": top(self.slot_writes),
            "slowest_ttft": [
                {
                    "sent_at_s": round(s.token_times[0] - s.ttft_ms / 1000 - self.t0, 3),
                    "ttft_ms": s.ttft_ms,
                }
                for s in slow
                if s.token_times
            ],  # fmt: skip
            "jit_compiles": {
                "count": len(self.compiles),
                "total_ms": round(1000 * sum(s for _, _, s in self.compiles), 1),
                "slowest": [
                    {"kernel": name, "at_s": round(t - self.t0, 3), "ms": round(1000 * s, 1)}
                    for name, t, s in sorted(self.compiles, key=lambda c: c[2], reverse=True)
                ][:slowest],
            },
            "gc": {
                f"gen{gen}": {"count": c, "total_ms": 1000 * t, "max_ms": 1000 * w}
                for gen, (c, t, w) in sorted(by_gen.items())
            },
        }
