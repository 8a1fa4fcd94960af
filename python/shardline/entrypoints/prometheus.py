"""The engine's metrics dict (engine.metrics.engine_metrics) in the Prometheus text format
(version 0.0.4), every name prefixed `shardline_`.

Totals are counters, current values gauges, and step times summaries (quantiles 0.5, 0.9
and 0.99 over the engine's recent steps, with the total step count); per-rank step times
carry a `rank` label. A value the engine does not have yet (no step, no prefix-cache
lookup) is NaN.
"""

from __future__ import annotations

import math

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_GAUGES = {
    "num_requests_running": "Requests with a sequence in the running set.",
    "num_requests_waiting": "Unfinished requests with no running sequence.",
    "kv_blocks_used": "KV-cache blocks held by sequences.",
    "kv_blocks_total": "KV-cache blocks in all.",
    "kv_usage": "Share of the KV-cache blocks held by sequences.",
    "prefix_cache_hit_rate": "Prompt tokens found in the prefix cache over tokens looked up.",
    "generation_tokens_per_s": "Generated tokens per second over the last 10 s.",
    "computed_tokens_per_s": "Tokens through the model per second over the last 10 s.",
}
_COUNTERS = {
    "num_preemptions": ("preemptions_total", "Sequences preempted for want of KV blocks."),
    "num_steps": ("steps_total", "Engine steps run."),
    "generation_tokens_total": ("generation_tokens_total", "Tokens generated."),
    "computed_tokens_total": ("computed_tokens_total", "Tokens through the model."),
}
_QUANTILES = (("0.5", "p50"), ("0.9", "p90"), ("0.99", "p99"))


def render(metrics: dict) -> str:
    """The exposition text of `metrics`, ending with a newline."""
    lines: list[str] = []
    for key, help_text in _GAUGES.items():
        _family(lines, key, "gauge", help_text, [("", metrics[key])])
    for key, (name, help_text) in _COUNTERS.items():
        _family(lines, name, "counter", help_text, [("", metrics[key])])
    _family(lines, "finished_completions_total", "counter",
            "Completions finished, by finish reason.",
            [(f'{{reason="{reason}"}}', count)
             for reason, count in metrics["finished_completions"].items()])
    _summary(lines, "step_time_seconds", "Engine time per step.", [("", metrics["step_time_s"])])
    if "step_time_per_rank_s" in metrics:
        _summary(lines, "rank_step_time_seconds", "Each rank's execute_model time per step.",
                 [(f'rank="{r["rank"]}"', r) for r in metrics["step_time_per_rank_s"]])
    return "\n".join(lines) + "\n"


def _family(lines: list[str], name: str, kind: str, help_text: str,
            samples: list[tuple[str, float | int | None]]) -> None:
    lines += [f"# HELP shardline_{name} {help_text}", f"# TYPE shardline_{name} {kind}"]
    lines += [f"shardline_{name}{labels} {_number(value)}" for labels, value in samples]


def _summary(lines: list[str], name: str, help_text: str,
             series: list[tuple[str, dict]]) -> None:
    lines += [f"# HELP shardline_{name} {help_text}", f"# TYPE shardline_{name} summary"]
    for labels, stats in series:
        for quantile, key in _QUANTILES:
            label = ",".join(filter(None, (labels, f'quantile="{quantile}"')))
            lines.append(f"shardline_{name}{{{label}}} {_number(stats[key])}")
        suffix = f"{{{labels}}}" if labels else ""
        lines.append(f"shardline_{name}_sum{suffix} {_number(stats['sum'])}")
        lines.append(f"shardline_{name}_count{suffix} {_number(stats['count'])}")


def _number(value: float | int | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "NaN"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))
