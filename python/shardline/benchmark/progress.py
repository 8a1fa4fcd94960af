"""A one-line progress bar on stderr for long runs: done/total, rate and time left."""

from __future__ import annotations

import sys
import time
from typing import TextIO


ETA_AFTER = 0.1  # the share done before the time left is shown


class ProgressBar:
    """Draws at once (0 done), so a run shows it has started, then redraws at most every
    `interval` seconds; `close` draws the last state and ends the line. With
    `enabled=False` it draws nothing. The time left shows once ETA_AFTER of the total is
    done: an offline run's first output tokens come only after its prompts' prefill, and
    the rate of those few said '19378s left' for a run of minutes."""

    def __init__(self, total: int, label: str, enabled: bool = True,
                 stream: TextIO | None = None, interval: float = 0.2) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream or sys.stderr
        self.interval = interval
        self.done = 0
        self._start = time.monotonic()
        self._drawn = float("-inf")
        self._draw(self._start)

    def update(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if now - self._drawn >= self.interval:
            self._draw(now)

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, now: float) -> None:
        if not self.enabled:
            return
        self._drawn = now
        elapsed = now - self._start
        share = self.done / self.total if self.total else 1.0
        filled = int(share * 24)
        rate = self.done / elapsed if elapsed > 0 else 0.0
        known = rate > 0 and self.done >= ETA_AFTER * self.total
        eta = f"{(self.total - self.done) / rate:.0f}s left" if known else "--"
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (24 - filled)}] "
                          f"{self.done}/{self.total} {rate:.1f}/s {eta}   ")
        self.stream.flush()
