"""The online run: requests arrive as a Poisson process at a given rate, each streamed.

A target is what the requests go to: an in-process AsyncLLM (`EngineTarget`) or an
OpenAI-compatible server's /v1/completions (`ServerTarget`, shardline serve or any
other). Both stream, so time to first token is measured where the client sees it: in
process, when the engine's output first holds a token; from a server, when the first
chunk carrying a choice arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from typing import AsyncIterator, NamedTuple, Protocol

from shardline.benchmark.offline import RunResult, kv_share_in_use
from shardline.benchmark.progress import ProgressBar
from shardline.benchmark.results import RequestRecord
from shardline.benchmark.workload import Workload
from shardline.sampling_params import SamplingParams


class Counts(NamedTuple):
    """A streaming request's tokens so far: its output, its prompt (None until the target
    knows it), and whether the output count is an estimate rather than the target's own."""

    output_tokens: int
    prompt_tokens: int | None = None
    estimated: bool = False


class Target(Protocol):
    def stream(self, request_id: str, prompt: list[int] | str,
               max_tokens: int) -> AsyncIterator[Counts]:
        """Yields the request's counts each time its output grows; raises if it fails."""
        ...

    def kv_usage(self) -> float | None:
        """The share of the KV cache in use now, or None if the target cannot tell."""
        ...


class EngineTarget:
    """Requests into an AsyncLLM in this process (greedy, ignore_eos); the counts are the
    engine's token ids."""

    def __init__(self, llm) -> None:
        self.llm = llm

    async def stream(self, request_id: str, prompt: list[int] | str,
                     max_tokens: int) -> AsyncIterator[Counts]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        async for output in self.llm.generate(prompt, params, request_id):
            yield Counts(len(output.outputs[0].token_ids), len(output.prompt_token_ids))

    def kv_usage(self) -> float | None:
        """Read without stopping the engine thread."""
        return kv_share_in_use(self.llm.engine)


class ServerTarget:
    """Requests to an OpenAI-compatible server: POST {url}/v1/completions with stream=True,
    temperature 0 and ignore_eos (an extension that shardline serve and vLLM accept), so
    each request generates its max_tokens; prompts that are token ids go as token ids.

    The counts are the stream's final `usage` chunk (asked for with stream_options, sent
    by shardline serve and vLLM): prompt_tokens and completion_tokens. A server that sends
    no usage leaves a text prompt's tokens unknown, and its output tokens are estimated
    as one per chunk carrying a choice: shardline serve and vLLM send one per engine
    step that gave the completion tokens, even when they complete no text (part of a
    multi-byte character, a special token), so the estimate is low only when a step
    makes several tokens or a server merges steps. Time to first token is the time to
    the first chunk carrying a choice, its text possibly empty.

    A request fails on an HTTP error, on an error event in the stream (shardline serve
    ends a stream so when the engine fails the request after its 200 was sent), on a
    stream that ends without `data: [DONE]`, and with TimeoutError when connecting,
    sending it, or any wait for the server's next data (its headers, the next chunk)
    takes more than `request_timeout` seconds: a hung server fails its requests rather
    than hanging the run. Waiting for one of the client's connections is not timed: that
    queue is the client's own."""

    def __init__(self, url: str, model: str, client, request_timeout: float) -> None:
        if not 0 < request_timeout < float("inf"):
            raise ValueError(f"request_timeout={request_timeout!r} is invalid: must be a "
                             "finite number of seconds > 0")
        self.url = url.rstrip("/")
        self.model = model
        self.client = client
        self.request_timeout = request_timeout

    async def stream(self, request_id: str, prompt: list[int] | str,
                     max_tokens: int) -> AsyncIterator[Counts]:
        import httpx

        endpoint = f"{self.url}/v1/completions"
        timeout = httpx.Timeout(self.request_timeout, pool=None)
        try:
            async for counts in self._stream(endpoint, timeout, prompt, max_tokens):
                yield counts
        except httpx.TimeoutException as exc:
            waiting = ("connecting" if isinstance(exc, httpx.ConnectTimeout) else
                       "sending the request" if isinstance(exc, httpx.WriteTimeout) else
                       "waiting for the server's next data")
            raise TimeoutError(f"{endpoint} timed out after {self.request_timeout:g} s "
                               f"{waiting}") from None

    async def _stream(self, endpoint: str, timeout, prompt: list[int] | str,
                      max_tokens: int) -> AsyncIterator[Counts]:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0.0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        prompt_tokens = len(prompt) if isinstance(prompt, list) else None
        chunks = 0
        async with self.client.stream("POST", endpoint, json=body, timeout=timeout) as reply:
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
                    yield Counts(usage["completion_tokens"],
                                 usage.get("prompt_tokens", prompt_tokens))
                elif chunk.get("choices"):
                    chunks += 1
                    yield Counts(chunks, prompt_tokens, estimated=True)
            if not done:
                raise RuntimeError(f"{endpoint}'s stream ended without its final "
                                   "'data: [DONE]'")

    def kv_usage(self) -> float | None:
        return None


def arrival_times(count: int, rate: float, seed: int) -> list[float]:
    """Seconds from the start at which each request arrives: a Poisson process of `rate`
    requests per second (exponential gaps), or all at 0 when rate is infinite.

    The gaps come from a stream of their own derived from `seed`, not from the one that
    makes the synthetic workload of that seed (random.Random(seed)), whose first draws
    they would repeat: a long first prompt would then arrive after a long first gap.
    Every rate uses the same draws, scaled by 1/rate."""
    if rate == float("inf"):
        return [0.0] * count
    rng = random.Random(f"arrivals-{seed}")
    times, now = [], 0.0
    for _ in range(count):
        now += rng.expovariate(rate)
        times.append(now)
    return times


async def run_online(target: Target, workload: Workload, rate: float, seed: int = 0,
                     progress: bool = False, max_concurrency: int | None = None) -> RunResult:
    """Send the workload at `rate` requests/s and wait for every answer. With
    `max_concurrency`, a request that arrives while that many are in flight waits for one
    to end, and its arrival (from which its latencies count) is when it is sent. A request
    that fails (the target raises) is recorded with its error and the others go on.
    Cancelling the run (Ctrl-C) keeps what was measured; the requests still open are
    abandoned, which aborts them."""
    if not rate > 0:
        raise ValueError(f"request rate {rate!r} is invalid: must be > 0 (inf: all at once)")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency={max_concurrency!r} is invalid: must be >= 1 (or "
                         "None: no limit)")
    slots = (contextlib.nullcontext() if max_concurrency is None
             else asyncio.Semaphore(max_concurrency))
    arrivals = arrival_times(len(workload.prompts), rate, seed)
    records = [RequestRecord(arrival=at) for at in arrivals]
    bar = ProgressBar(len(records), f"rate {rate:g}/s", enabled=progress)
    peak_kv: float | None = None   # the largest KV-cache use seen while a request streamed
    start = time.perf_counter()

    async def one(index: int) -> None:
        nonlocal peak_kv
        record = records[index]
        await asyncio.sleep(max(0.0, start + record.arrival - time.perf_counter()))
        async with slots:
            record.arrival = time.perf_counter() - start
            try:
                async for counts in target.stream(f"bench-{seed}-{index}",
                                                  workload.prompts[index],
                                                  workload.max_tokens[index]):
                    if record.first_token is None and counts.output_tokens:
                        record.first_token = time.perf_counter() - start
                    record.output_tokens = counts.output_tokens
                    record.output_estimated = counts.estimated
                    if counts.prompt_tokens is not None:
                        record.prompt_tokens = counts.prompt_tokens
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
    return RunResult(records, elapsed, peak_kv_usage=peak_kv, interrupted=interrupted,
                     extra={"request_rate": rate, "max_concurrency": max_concurrency})


def describe(exc: BaseException) -> str:
    """A failed request's error on one line: the exception's type and message."""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
