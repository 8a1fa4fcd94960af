"""The engine's own time per step on this machine's CPU, measured by running the engine.

A model with tiny weights (hidden 64) and a real model's attention (8 heads, 4 KV heads
of 32) decodes on the CPU at 2 and 10 layers, 1 and 16 sequences and a short context,
and at 10 layers and 16 sequences with a long one. The median decode step of each run
is a point of

    t = step + step_per_seq * B + L * (layer + layer_per_seq * B) + KV bytes / attention

for B sequences through L layers: the long context gives the rate at which the
reference attention reads the KV cache, the four short points the four host terms
(the tiny weights' own time stays in the layer terms; it is small against their Python).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

SHAPE = dict(hidden_size=64, intermediate_size=64, num_attention_heads=8,
             num_key_value_heads=4, head_dim=32)
KV_BYTES_PER_TOKEN_LAYER = 2 * 4 * 32 * 4  # K and V, 4 heads of 32 fp32
BLOCK_SIZE = 16
SHORT, LONG = 16, 496
OUTPUT_LEN = 16
LAYERS, BATCHES = (2, 10), (1, 16)
RUNS = 5


@dataclass(frozen=True)
class HostTimes:
    """The host terms of DeviceSpec and the attention's KV read rate (bytes/s)."""

    step_host_s: float
    step_host_per_seq_s: float
    layer_host_s: float
    layer_host_per_seq_s: float
    attention_bandwidth: float


def kv_bytes(layers: int, batch: int, prompt_len: int) -> float:
    """KV cache bytes a decode step of the fit's model reads, at the median step's
    context (the prompt and half the output)."""
    return KV_BYTES_PER_TOKEN_LAYER * layers * batch * (prompt_len + OUTPUT_LEN / 2)


def points() -> list[tuple[int, int, int]]:
    """(layers, sequences, prompt length) of each run the fit needs."""
    short = [(layers, batch, SHORT) for layers in LAYERS for batch in BATCHES]
    return short + [(LAYERS[-1], BATCHES[-1], LONG)]


def fit(step_s: dict[tuple[int, int, int], float]) -> HostTimes:
    """The five constants from the median decode step of each of `points()`; a host
    term that noise makes negative is 0."""
    (l1, l2), (b1, b2) = LAYERS, BATCHES
    short, long = step_s[(l2, b2, SHORT)], step_s[(l2, b2, LONG)]
    if long <= short:
        raise RuntimeError(f"a decode step over {LONG} cached tokens took {long * 1e3:.2f} ms, "
                           f"no longer than over {SHORT} ({short * 1e3:.2f} ms): the machine "
                           "is too busy to measure; profile it when it is idle")
    attention = (kv_bytes(l2, b2, LONG) - kv_bytes(l2, b2, SHORT)) / (long - short)
    host = {k: t - kv_bytes(*k) / attention for k, t in step_s.items() if k[2] == SHORT}
    layer = {b: (host[(l2, b, SHORT)] - host[(l1, b, SHORT)]) / (l2 - l1) for b in BATCHES}
    step = {b: host[(l1, b, SHORT)] - l1 * layer[b] for b in BATCHES}
    per_seq = lambda by_batch: (by_batch[b2] - by_batch[b1]) / (b2 - b1)
    layer_per_seq, step_per_seq = max(0.0, per_seq(layer)), max(0.0, per_seq(step))
    return HostTimes(step_host_s=max(0.0, step[b1] - b1 * step_per_seq),
                     step_host_per_seq_s=step_per_seq,
                     layer_host_s=max(0.0, layer[b1] - b1 * layer_per_seq),
                     layer_host_per_seq_s=layer_per_seq, attention_bandwidth=attention)


def _engine(layers: int, batch: int, prompt_len: int):
    """An LLM on the CPU for one point of the fit, its KV cache sized for the point."""
    from shardline import LLM
    from shardline.presets import build_variant

    path = build_variant("tiny-llama", num_hidden_layers=layers,
                         max_position_embeddings=LONG + OUTPUT_LEN, **SHAPE)
    return LLM(path, device="cpu", block_size=BLOCK_SIZE, max_num_seqs=batch,
               num_kv_blocks=batch * -(-(prompt_len + OUTPUT_LEN) // BLOCK_SIZE),
               max_num_batched_tokens=max(2048, batch * prompt_len),
               enable_prefix_caching=False)


def _median_decode_step(llm, batch: int, prompt_len: int, tag: str) -> float:
    """Prefill `batch` prompts in one step, then decode `OUTPUT_LEN` tokens greedily;
    the median decode step."""
    from shardline import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_LEN, ignore_eos=True)
    for i in range(batch):
        llm.add_request(f"{tag}-{i}", [3 + (i + j) % 256 for j in range(prompt_len)], params)
    steps = []
    while llm.has_unfinished_requests():
        start = time.perf_counter()
        llm.step()
        steps.append(time.perf_counter() - start)
    return statistics.median(steps[1:])


def measure_host(runs: int = RUNS) -> HostTimes:
    """Start an engine for every point of the fit, run them in turns (a warm-up run
    each, then `runs` rounds, so that a change in the machine's speed hits every point
    alike) and fit the medians over the rounds."""
    engines = {}
    try:
        for point in points():
            engines[point] = _engine(*point)
        steps: dict[tuple[int, int, int], list[float]] = {point: [] for point in engines}
        for run in range(runs + 1):
            for (layers, batch, prompt_len), llm in engines.items():
                step = _median_decode_step(llm, batch, prompt_len, str(run))
                if run:
                    steps[(layers, batch, prompt_len)].append(step)
    finally:
        for llm in engines.values():
            llm.shutdown()
    return fit({point: statistics.median(times) for point, times in steps.items()})
