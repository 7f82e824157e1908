"""What the engine's worker counts: forward sizes, outcomes, where a step's time goes."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class EngineStats:
    """Counters for tests and metrics: sizes of the forwards the worker ran."""

    prefill_batch_sizes: Counter = field(default_factory=Counter)
    decode_batch_sizes: Counter = field(default_factory=Counter)
    # Decode rows that rode in a mixed step's forward (one-token chunks before the prompts'),
    # by how many there were: with decode_batch_sizes, the rows decoded per step.
    mixed_decode_rows: Counter = field(default_factory=Counter)
    requests_finished: int = 0
    requests_failed: int = 0
    steps: int = 0
    steps_planned_ahead: int = 0  # launched before the step in flight's tokens were on the host
    step_phase_s: Counter = field(default_factory=Counter)  # seconds per phase of the steps

    @property
    def max_batch_size(self) -> int:
        return max([*self.prefill_batch_sizes, *self.decode_batch_sizes], default=0)


class Lap:
    """Adds the time since the previous lap to a phase's total: where a step's time goes."""

    __slots__ = ("totals", "last")

    def __init__(self, totals: Counter) -> None:
        self.totals, self.last = totals, time.perf_counter()

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.totals[phase] += now - self.last
        self.last = now
