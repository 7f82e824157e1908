"""Where a load level's slow first tokens come from: the engine thread's steps and admissions,
timed on the server, Python's garbage collections and Triton's just-in-time compiles (a kernel
specialization first met under load: compiled, or loaded from the disk cache, on the engine
thread), beside the slowest requests' send times.

Times are ``time.perf_counter()`` (system-wide monotonic on Linux), so the clients' process and
the server's share one clock; every time in the summary is seconds since the level started.
"""

from __future__ import annotations

import gc
import itertools
import math
import time

from triton import knobs


class StallTrace:
    """While entered: each engine step, admission and admission's slot writes (start, seconds,
    the engine thread's CPU seconds), the step profiled when ``profile`` (a
    ``cProfile.Profile``) is given, each garbage collection (generation, start, seconds) and
    each Triton JIT compile (kernel, start, seconds), and with ``timeline`` each launched
    step's span on the device (``DeviceTimeline``). The worker's admission runs between steps,
    while the step it launched runs on the device: one longer than that step leaves the device
    idle. Wall time far above CPU time is waiting: for the GIL, a lock or the device."""

    def __init__(self, worker, profile=None, timeline: DeviceTimeline | None = None) -> None:
        self.worker, self.profile, self.timeline = worker, profile, timeline
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
        self._originals = (w._step, w._admit, w._write_adapters, w._launch)
        if self.timeline is not None:
            w._launch = self.timeline.wrap(w._launch)
        w._step = self._timed(w._step, self.steps, self.profile)
        w._admit = self._timed(w._admit, self.admissions, self.profile)
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
        w = self.worker
        w._step, w._admit, w._write_adapters, w._launch = self._originals

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
            "device": self.timeline.summary() if self.timeline is not None else None,
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


class DeviceTimeline:
    """Each launched step's span on the engine's stream: an event recorded before its launches
    and one after (the stream reaches the first when it is done with what came before), with
    what the step held. From them: the device time of decode-only and of mixed steps, and the
    gaps between steps, when the device waited for the host (slot writes, queued between two
    steps, count as gaps). ``event``: a CUDA event factory (tests pass a host-clock one)."""

    def __init__(self, event=None) -> None:
        if event is None:
            import torch

            def event():
                return torch.cuda.Event(enable_timing=True)

        self.event = event
        self.spans: list[tuple[object, object, int, int]] = []  # start, end, rows, prompt tokens
        self.launched_at: list[float] = []  # each span's launch on the host (perf_counter)

    def wrap(self, launch):
        def timed(*args):
            at = time.perf_counter()
            start = self.event()
            start.record()
            launched = launch(*args)  # (plan, its sampling) or None
            end = self.event()
            end.record()
            if launched is not None:
                plan = launched[0]
                chunked = sum(len(c.token_ids) for c in plan.chunks)
                rows = len(plan.decode) + plan.decode_chunks
                self.spans.append((start, end, rows, chunked - plan.decode_chunks))
                self.launched_at.append(at)
            return launched

        return timed

    def device_ms(self, since: float = -math.inf, until: float = math.inf) -> list[float]:
        """Device ms of each step launched between ``since`` and ``until`` (perf_counter)."""
        if not self.spans:
            return []
        self.spans[-1][1].synchronize()
        return [
            start.elapsed_time(end)
            for (start, end, _, _), at in zip(self.spans, self.launched_at, strict=True)
            if since <= at < until
        ]

    def summary(self) -> dict | None:
        """Device ms of decode-only steps (by rows) and of mixed or prefill steps (by prompt
        tokens), the gaps between steps, and the share of the span the device was busy."""
        if not self.spans:
            return None
        self.spans[-1][1].synchronize()
        busy = [start.elapsed_time(end) for start, end, _, _ in self.spans]
        gaps = [a[1].elapsed_time(b[0]) for a, b in itertools.pairwise(self.spans)]
        whole = self.spans[0][0].elapsed_time(self.spans[-1][1])
        decode, mixed = {}, {}
        for (_, _, rows, tokens), ms in zip(self.spans, busy, strict=True):
            if tokens:
                bucket = mixed.setdefault(_bucket(tokens), [0, 0.0, 0, 0])
                bucket[2] += tokens
                bucket[3] += rows
            else:
                bucket = decode.setdefault(_bucket(rows), [0, 0.0])
            bucket[0] += 1
            bucket[1] += ms

        def per_step(groups, names):
            return {
                key: {"steps": g[0], "ms_mean": g[1] / g[0], "ms_total": g[1]}
                | {name: g[i] / g[0] for i, name in enumerate(names, 2)}
                for key, g in sorted(groups.items(), key=lambda kv: int(kv[0].split("-")[0]))
            }

        ordered = sorted(gaps)
        return {
            "span_ms": whole,
            "busy_share": sum(busy) / whole,
            "gap_ms_total": sum(gaps),
            "gap_ms_p50": ordered[len(ordered) // 2] if ordered else 0.0,
            "gap_ms_p99": ordered[int(len(ordered) * 0.99)] if ordered else 0.0,
            "decode_steps_by_rows": per_step(decode, ()),
            "mixed_steps_by_prompt_tokens": per_step(mixed, ("prompt_tokens_mean", "rows_mean")),
        }


def _bucket(n: int) -> str:
    """ "lo-hi": the power-of-two range n falls in (1-1, 2-3, 4-7, ...)."""
    lo = 1 << (n.bit_length() - 1)
    return f"{lo}-{2 * lo - 1}"
