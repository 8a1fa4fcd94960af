"""A rolling window of step durations and their percentiles.

The engine keeps one (per engine step) and so does each worker (per `execute_model`), so
that metrics can show how long steps take and which rank is slow. It lives outside
engine/ and worker/ because both import it.
"""

from __future__ import annotations

import collections
from typing import Iterable

WINDOW = 1024  # most recent steps the percentiles cover


class StepTimes:
    """The durations (seconds) of the last `window` steps; how many steps ever, and how
    long they took in all."""

    def __init__(self, window: int = WINDOW) -> None:
        self._recent: collections.deque[float] = collections.deque(maxlen=window)
        self.count = 0
        self.total = 0.0

    def record(self, seconds: float) -> None:
        self._recent.append(seconds)
        self.count += 1
        self.total += seconds

    def samples(self) -> list[float]:
        """The durations in the window, oldest first (a copy)."""
        return list(self._recent)

    def summary(self) -> dict[str, float | int | None]:
        """count and sum (all steps ever), and mean, p50, p90, p99, max over the window,
        in seconds; None while there is no step yet."""
        return summarize(self.samples(), self.count, self.total)


def summarize(samples: Iterable[float], count: int, total: float
              ) -> dict[str, float | int | None]:
    """`count`, `total` (as "sum") and the mean, p50, p90, p99 and max (nearest rank) of
    `samples`."""
    ordered = sorted(samples)
    if not ordered:
        return {"count": count, "sum": total, "mean": None, "p50": None, "p90": None, "p99": None,
                "max": None}

    def rank(percent: int) -> float:
        return ordered[max(0, -(-len(ordered) * percent // 100) - 1)]

    return {"count": count, "sum": total, "mean": sum(ordered) / len(ordered), "p50": rank(50),
            "p90": rank(90), "p99": rank(99), "max": ordered[-1]}
