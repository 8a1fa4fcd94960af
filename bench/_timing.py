"""The timing loop the device benches share: the median of many runs after a warm-up, and
the device's copy bandwidth measured with it."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


class Timer:
    """Median milliseconds of a call over `reps` runs after `warmup`, the runs cycling over
    `copies` input sets (fn gets the index of the set to use).

    On CUDA each run is timed with events; with `sleep_cycles`, each behind a GPU sleep of
    that many cycles, so that the host's launch overhead (which the engine hides with CUDA
    graphs) is not counted. Elsewhere the wall clock times each run. `last_output` keeps what
    the last run on input set 0 returned, so that a check of the result need not run the call
    once more (under the Triton interpreter, a dry run's main cost).
    """

    def __init__(self, device: torch.device, warmup: int, reps: int,
                 sleep_cycles: int = 0) -> None:
        self.device, self.warmup, self.reps = device, warmup, reps
        self.sleep_cycles = sleep_cycles
        self.last_output: object = None

    def __call__(self, fn: Callable[[int], object], copies: int = 1) -> float:
        for i in range(self.warmup):
            fn(i % copies)
        if self.device.type != "cuda":
            times = []
            for i in range(self.reps):
                start = time.perf_counter()
                out = fn(i % copies)
                times.append((time.perf_counter() - start) * 1e3)
                if i % copies == 0:
                    self.last_output = out
            return statistics.median(times)
        torch.cuda.synchronize(self.device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.reps)]
        for i, (start, end) in enumerate(events):
            if self.sleep_cycles:
                torch.cuda._sleep(self.sleep_cycles)
            start.record()
            out = fn(i % copies)
            end.record()
            if i % copies == 0:
                self.last_output = out
        torch.cuda.synchronize(self.device)
        return statistics.median(start.elapsed_time(end) for start, end in events)


def alternating_medians(fns: dict[str, Callable[[], object]], warmup: int,
                        reps: int) -> dict[str, float]:
    """Median wall-clock milliseconds of each of several CPU calls, run in turn round after
    round, so that a change in the machine's load meets every one of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(warmup + reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if rep >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def copy_bandwidth(timer: Timer, num_bytes: int) -> float:
    """Bytes/s of a copy of `num_bytes` on the timer's device, counting the read and the
    write: the ceiling a memory-bound kernel is judged against."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=timer.device)
    dst = torch.empty_like(src)
    return 2 * num_bytes / (timer(lambda i: dst.copy_(src)) / 1e3)
