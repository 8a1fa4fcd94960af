"""The online run: requests arrive as a Poisson process at a given rate, each streamed.

A target is what the requests go to: an in-process AsyncLLM (`EngineTarget`) or an
OpenAI-compatible server's /v1/completions (`ServerTarget`, shardline serve or any
other). Both stream, so time to first token is measured where the client sees it.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import AsyncIterator, Protocol

from shardline.benchmark.offline import RunResult
from shardline.benchmark.progress import ProgressBar
from shardline.benchmark.results import RequestRecord
from shardline.benchmark.workload import Workload
from shardline.sampling_params import SamplingParams


class Target(Protocol):
    def prompt_tokens(self, prompt: list[int] | str, max_tokens: int) -> int: ...

    def stream(self, request_id: str, prompt: list[int] | str,
               max_tokens: int) -> AsyncIterator[int]:
        """Yields the request's output token count each time it grows."""
        ...

    def kv_usage(self) -> float | None:
        """The share of the KV cache in use now, or None if the target cannot tell."""
        ...


class EngineTarget:
    """Requests into an AsyncLLM in this process (greedy, ignore_eos)."""

    def __init__(self, llm) -> None:
        self.llm = llm

    def _params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    def prompt_tokens(self, prompt: list[int] | str, max_tokens: int) -> int:
        return len(self.llm.engine.encode_prompt(prompt, self._params(max_tokens))[1])

    async def stream(self, request_id: str, prompt: list[int] | str,
                     max_tokens: int) -> AsyncIterator[int]:
        async for output in self.llm.generate(prompt, self._params(max_tokens), request_id):
            yield len(output.outputs[0].token_ids)

    def kv_usage(self) -> float | None:
        """The share of KV blocks in use, read without stopping the engine thread (a
        length read, safe under the GIL)."""
        cores = getattr(self.llm.engine, "cores", [self.llm.engine])
        total = sum(core.kv.num_blocks for core in cores)
        return sum(core.kv.num_blocks - core.kv.num_free_blocks for core in cores) / total


class ServerTarget:
    """Requests to an OpenAI-compatible server: POST {url}/v1/completions with stream=True,
    temperature 0 and ignore_eos (an extension that shardline serve and vLLM accept), so
    each request generates its max_tokens; prompts that are token ids go as token ids.
    Output tokens are counted from the stream's `usage` when the server sends it, else
    one per content chunk. A request fails on an HTTP error, on an error event in the
    stream (shardline serve ends a stream so when the engine fails the request after its
    200 was sent), and on a stream that ends without `data: [DONE]`."""

    def __init__(self, url: str, model: str, client) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.client = client

    def prompt_tokens(self, prompt: list[int] | str, max_tokens: int) -> int:
        return len(prompt) if isinstance(prompt, list) else 0

    async def stream(self, request_id: str, prompt: list[int] | str,
                     max_tokens: int) -> AsyncIterator[int]:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0.0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        count = 0
        endpoint = f"{self.url}/v1/completions"
        async with self.client.stream("POST", endpoint, json=body) as reply:
            if reply.status_code != 200:
                text = (await reply.aread()).decode(errors="replace")
                raise RuntimeError(f"{endpoint} answered {reply.status_code}: {text[:300]}")
            done = False
            async for line in reply.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    error = chunk["error"]
                    message = error.get("message") if isinstance(error, dict) else error
                    raise RuntimeError(f"{endpoint} ended the stream with an error: "
                                       f"{str(message)[:300]}")
                usage = chunk.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    count = usage["completion_tokens"]
                    yield count
                elif chunk.get("choices") and chunk["choices"][0].get("text"):
                    count += 1
                    yield count
            if not done:
                raise RuntimeError(f"{endpoint}'s stream ended without its final "
                                   "'data: [DONE]'")

    def kv_usage(self) -> float | None:
        return None


def arrival_times(count: int, rate: float, seed: int) -> list[float]:
    """Seconds from the start at which each request arrives: a Poisson process of `rate`
    requests per second (exponential gaps), or all at 0 when rate is infinite."""
    if rate == float("inf"):
        return [0.0] * count
    rng = random.Random(seed)
    times, now = [], 0.0
    for _ in range(count):
        now += rng.expovariate(rate)
        times.append(now)
    return times


async def run_online(target: Target, workload: Workload, rate: float, seed: int = 0,
                     progress: bool = False) -> RunResult:
    """Send the workload at `rate` requests/s and wait for every answer. A request that
    fails (the target raises) is recorded with its error and the others go on. Cancelling
    the run (Ctrl-C) keeps what was measured; the requests still open are abandoned, which
    aborts them."""
    if not rate > 0:
        raise ValueError(f"request rate {rate!r} is invalid: must be > 0 (inf: all at once)")
    arrivals = arrival_times(len(workload.prompts), rate, seed)
    records = [_record(target, at, prompt, n)
               for at, prompt, n in zip(arrivals, workload.prompts, workload.max_tokens)]
    bar = ProgressBar(len(records), f"rate {rate:g}/s", enabled=progress)
    peak_kv: float | None = None   # the largest KV-cache use seen while a request streamed
    start = time.perf_counter()

    async def one(index: int) -> None:
        nonlocal peak_kv
        record = records[index]
        await asyncio.sleep(max(0.0, start + record.arrival - time.perf_counter()))
        record.arrival = time.perf_counter() - start
        if record.error is None:
            try:
                async for count in target.stream(f"bench-{seed}-{index}",
                                                 workload.prompts[index],
                                                 workload.max_tokens[index]):
                    if record.first_token is None and count:
                        record.first_token = time.perf_counter() - start
                    record.output_tokens = count
                    usage = target.kv_usage()
                    if usage is not None:
                        peak_kv = usage if peak_kv is None else max(peak_kv, usage)
            except Exception as exc:
                record.error = describe(exc)
            else:
                record.done = time.perf_counter() - start
        bar.update()

    tasks = [asyncio.ensure_future(one(i)) for i in range(len(records))]
    interrupted = False
    try:
        await asyncio.gather(*tasks)
    except (asyncio.CancelledError, KeyboardInterrupt):
        interrupted = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    return RunResult(records, elapsed, peak_kv_usage=peak_kv,
                     interrupted=interrupted, extra={"request_rate": rate})


def _record(target: Target, arrival: float, prompt: list[int] | str,
            max_tokens: int) -> RequestRecord:
    """The request's record, failed already if the target refuses to count its prompt."""
    try:
        return RequestRecord(arrival=arrival, prompt_tokens=target.prompt_tokens(prompt,
                                                                                  max_tokens))
    except Exception as exc:
        return RequestRecord(arrival=arrival, prompt_tokens=0, error=describe(exc))


def describe(exc: BaseException) -> str:
    """A failed request's error on one line: the exception's type and message."""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
