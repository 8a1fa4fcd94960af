"""Per-request measurements and what a run reports from them.

Times are seconds from the run's start. TTFT is from a request's arrival (its submission)
to its first output token, TPOT the mean time per output token after the first, and
end-to-end latency from arrival to the last token. Rates are over the run's wall time.
A request that failed (an HTTP error, an engine error) is counted and its error kept, but
it adds nothing to the tokens, rates or latencies, which describe the requests served.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass
class RequestRecord:
    """One request of a run; `first_token` and `done` stay None until they happen, `error`
    unless the request fails (then `done` stays None), `prompt_tokens` until the target
    tells it. `output_estimated`: the output count is an estimate (see ServerTarget)."""

    arrival: float
    prompt_tokens: int | None = None
    output_tokens: int = 0
    output_estimated: bool = False
    first_token: float | None = None
    done: float | None = None
    error: str | None = None


ERRORS_SHOWN = 5   # distinct error messages a summary lists, in the order first seen


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p90 and p99 by linear interpolation between the closest ranks (numpy.percentile's
    default), and the mean; {} for no values."""
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> float:
        position = q * (len(ordered) - 1)
        below = int(position)
        above = min(below + 1, len(ordered) - 1)
        return ordered[below] + (ordered[above] - ordered[below]) * (position - below)

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99),
            "mean": statistics.fmean(ordered)}


def summarize(records: list[RequestRecord], elapsed_s: float) -> dict:
    """The run's rates and latency percentiles over its requests that did not fail (an
    interrupted run reports what finished; output tokens count every such request's), the
    number that failed and their first distinct errors. Input tokens are None when a
    finished request's prompt was never counted; `estimated_output_counts` is the number
    of requests whose output tokens were estimated."""
    failed = [r for r in records if r.error is not None]
    served = [r for r in records if r.error is None]
    finished = [r for r in served if r.done is not None]
    output_tokens = sum(r.output_tokens for r in served)
    input_tokens = (None if any(r.prompt_tokens is None for r in finished)
                    else sum(r.prompt_tokens for r in finished))
    return {
        "elapsed_s": elapsed_s,
        "requests": len(records),
        "finished_requests": len(finished),
        "failed_requests": len(failed),
        "errors": distinct_errors(failed),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "estimated_output_counts": sum(r.output_estimated for r in served),
        "requests_per_s": len(finished) / elapsed_s,
        "input_tokens_per_s": None if input_tokens is None else input_tokens / elapsed_s,
        "output_tokens_per_s": output_tokens / elapsed_s,
        "total_tokens_per_s": (None if input_tokens is None
                               else (input_tokens + output_tokens) / elapsed_s),
        "ttft_s": percentiles([r.first_token - r.arrival for r in served
                               if r.first_token is not None]),
        "tpot_s": percentiles([(r.done - r.first_token) / (r.output_tokens - 1)
                               for r in finished if r.output_tokens > 1]),
        "e2e_latency_s": percentiles([r.done - r.arrival for r in finished]),
    }


def distinct_errors(failed: list[RequestRecord]) -> list[dict]:
    """The first ERRORS_SHOWN distinct messages of the failed requests, each with the
    number of requests that failed with it."""
    counts: dict[str, int] = {}
    for record in failed:
        counts[record.error] = counts.get(record.error, 0) + 1
    return [{"error": error, "requests": n} for error, n in list(counts.items())[:ERRORS_SHOWN]]
