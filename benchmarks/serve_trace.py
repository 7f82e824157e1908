"""Where a load level's slow first tokens come from: the engine's slowest steps and Python's
garbage collections, timed on the server, beside the slowest requests' send times.

Times are ``time.perf_counter()`` (system-wide monotonic on Linux), so the clients' process and
the server's share one clock; every time in the summary is seconds since the level started.
"""

from __future__ import annotations

import gc
import time


class StallTrace:
    """Records each engine step (start, duration) and each garbage collection (generation,
    duration) between ``start()`` and ``stop()``."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.steps: list[tuple[float, float]] = []
        self.collections: list[tuple[int, float, float]] = []  # (generation, start, seconds)
        self._gc_start = 0.0

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            now = time.perf_counter()
            self.collections.append((info["generation"], self._gc_start, now - self._gc_start))

    def start(self) -> None:
        self.t0 = time.perf_counter()
        gc.callbacks.append(self._on_gc)

    def stop(self) -> None:
        gc.callbacks.remove(self._on_gc)

    def step(self, started: float, seconds: float) -> None:
        self.steps.append((started, seconds))

    def summary(self, samples, slowest: int = 5) -> dict:
        """The slowest steps and requests (by TTFT) with when they began, and the collections
        per generation: the pattern tells a one-time stall from a steady tail."""
        at = lambda t: round(t - self.t0, 3)  # noqa: E731
        steps = sorted(self.steps, key=lambda s: s[1], reverse=True)[:slowest]
        slow = sorted(samples, key=lambda s: s.ttft_ms, reverse=True)[:slowest]
        by_gen = {}
        for gen, _, seconds in self.collections:
            count, total, worst = by_gen.get(gen, (0, 0.0, 0.0))
            by_gen[gen] = (count + 1, total + seconds, max(worst, seconds))
        return {
            "slowest_steps": [{"at_s": at(t), "ms": round(1000 * s, 2)} for t, s in steps],
            "slowest_ttft": [
                {"sent_at_s": at(s.token_times[0] - s.ttft_ms / 1000), "ttft_ms": s.ttft_ms}
                for s in slow
                if s.token_times
            ],
            "gc": {
                f"gen{gen}": {"count": c, "total_ms": 1000 * t, "max_ms": 1000 * w}
                for gen, (c, t, w) in sorted(by_gen.items())
            },
        }
