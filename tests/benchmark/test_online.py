"""The online runner's failed requests: each is recorded with its error while the others go
on, the metrics describe the requests served, and a run where every request failed is
an error, not a report of zeros. Fake targets keep these fast; the engine's own refusal
runs on tiny-llama."""

import asyncio
import json
import socket

import numpy
import pytest

from shardline.benchmark.online import Counts, EngineTarget, arrival_times, run_online
from shardline.benchmark.workload import Workload, make_workload
from shardline.cli import main

SLOW_FAILURE_S = 0.2   # how long a failing fake request takes to fail


class FlakyTarget:
    """Request i yields one token per chunk, or, if i is in `failures`, its first token
    after SLOW_FAILURE_S and then raises RuntimeError(failures[i])."""

    def __init__(self, failures: dict[int, str]) -> None:
        self.failures = failures

    async def stream(self, request_id, prompt, max_tokens):
        index = int(request_id.rsplit("-", 1)[1])
        if index in self.failures:
            await asyncio.sleep(SLOW_FAILURE_S)
            yield Counts(1, len(prompt))
            raise RuntimeError(self.failures[index])
        for count in range(1, max_tokens + 1):
            yield Counts(count, len(prompt))

    def kv_usage(self):
        return None


def random_workload(rng, count):
    prompts = [[rng.randrange(8, 300) for _ in range(rng.randint(1, 9))] for _ in range(count)]
    return Workload(prompts, [rng.randint(2, 9) for _ in range(count)])


def test_a_failed_request_is_recorded_and_the_others_go_on(rng):
    count = rng.randint(8, 20)
    workload = random_workload(rng, count)
    failing = rng.sample(range(count), rng.randint(1, count - 2))
    messages = [f"boom {i}" for i in range(rng.randint(1, 8))]
    failures = {i: rng.choice(messages) for i in failing}
    result = asyncio.run(run_online(FlakyTarget(failures), workload, float("inf"),
                                    rng.randrange(1000)))
    summary = result.summary()
    served = [i for i in range(count) if i not in failures]
    assert summary["requests"] == count and not summary["interrupted"]
    assert summary["failed_requests"] == len(failures)
    assert summary["finished_requests"] == len(served)
    assert summary["input_tokens"] == sum(len(workload.prompts[i]) for i in served)
    assert summary["output_tokens"] == sum(workload.max_tokens[i] for i in served)
    # The failed requests' late first tokens are not in the TTFT.
    assert summary["ttft_s"]["p99"] < SLOW_FAILURE_S
    first_seen = list(dict.fromkeys(failures[i] for i in sorted(failures)))
    assert summary["errors"] == [
        {"error": f"RuntimeError: {message}",
         "requests": sum(m == message for m in failures.values())}
        for message in first_seen[:5]]
    assert not result.all_failed


def test_requests_refused_by_the_engine_fail_alone(tiny_chat_model, rng):
    """A prompt longer than max_model_len raised out of the run, ending it unrecorded."""
    from shardline.engine.async_llm import AsyncLLM

    limit = 32
    count = rng.randint(4, 8)
    too_long = rng.sample(range(count), rng.randint(1, count - 1))
    lengths = [rng.randint(limit + 1, 2 * limit) if i in too_long else rng.randint(1, 20)
               for i in range(count)]
    workload = Workload([[rng.randrange(8, 300) for _ in range(n)] for n in lengths],
                        [rng.randint(1, 4) for _ in range(count)])
    llm = AsyncLLM(tiny_chat_model, block_size=4, num_kv_blocks=64, max_model_len=limit)
    try:
        summary = asyncio.run(run_online(EngineTarget(llm), workload, float("inf"))).summary()
    finally:
        llm.shutdown()
    assert summary["failed_requests"] == len(too_long)
    assert summary["finished_requests"] == count - len(too_long)
    assert summary["output_tokens"] == sum(workload.max_tokens[i] for i in range(count)
                                           if i not in too_long)
    expected = [f"ValueError: prompt has {lengths[i]} tokens, longer than max_model_len={limit}"
                for i in sorted(too_long)]
    assert [e["error"] for e in summary["errors"]] == list(dict.fromkeys(expected))[:5]


@pytest.fixture
def closed_port():
    """A local port bound but not listening for the whole test: connections to it are
    refused, and nothing else can take it meanwhile (a port probed free and closed could
    be given to another socket before the test connects)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_a_run_where_every_request_fails_exits_1_with_the_first_error(tmp_path, capsys,
                                                                       closed_port):
    """Against a port nobody listens on: no record of zeros, the sweep stops, the error
    is said in one line."""
    out = tmp_path / "runs.jsonl"
    url = f"http://127.0.0.1:{closed_port}"
    status = main(["bench", "-m", "tiny-llama", "--mode", "online", "--url", url,
                   "--num-prompts", "5", "--prompt-len", "2,4", "--output-len", "1,3",
                   "--request-rate", "inf,3", "--no-progress", "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 1
    assert not out.exists() and captured.out == ""
    [line] = captured.err.strip().splitlines()
    assert line.startswith("shardline bench: error: the online run at inf requests/s: every "
                           "one of its 5 requests failed, so it is not recorded; the first "
                           "error: ConnectError: "), line


def test_partly_failed_runs_are_recorded_with_their_failures(tmp_path, capsys, monkeypatch,
                                                              rng):
    """The record and the printed report carry the failed count and errors; a warning
    says the metrics are the others'."""
    import shardline.benchmark.online as online

    count = 6
    failures = {i: f"refused {rng.randrange(1000)}" for i in rng.sample(range(count), 2)}
    monkeypatch.setattr(online, "EngineTarget", lambda llm: FlakyTarget(failures))
    out = tmp_path / "runs.jsonl"
    capsys.readouterr()
    assert main(["bench", "-m", "tiny-llama", "--device", "cpu", "--mode", "online",
                 "--request-rate", "inf", "--num-prompts", str(count), "--prompt-len", "2,6",
                 "--output-len", "2,4", "--no-progress", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    results = record["results"]
    assert results["failed_requests"] == 2 and results["finished_requests"] == count - 2
    assert {e["error"] for e in results["errors"]} == {f"RuntimeError: {m}"
                                                       for m in failures.values()}
    assert json.loads(captured.out)["errors"] == results["errors"]
    assert "2 of 6 requests failed" in captured.err


@pytest.mark.parametrize("rate", [float("inf"), 50.0])
def test_the_engine_failing_every_request_is_not_a_report(rate, rng):
    count = rng.randint(2, 6)
    failures = {i: "engine stopped" for i in range(count)}
    result = asyncio.run(run_online(FlakyTarget(failures), random_workload(rng, count), rate))
    assert result.all_failed
    assert result.summary()["errors"] == [{"error": "RuntimeError: engine stopped",
                                           "requests": count}]


def ranks(values):
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0] * len(values)
    for rank, index in enumerate(order):
        result[index] = rank
    return result


def test_arrivals_are_independent_of_the_workload_of_their_seed(rng):
    """Both came from random.Random(seed): the first gap and the first prompt's length
    were drawn from the same number, rank-correlated at 1.0 across seeds."""
    seeds = rng.sample(range(1 << 30), 400)
    lengths = [len(make_workload(1, 300, seed=s, prompt_len=(1, 1000)).prompts[0])
               for s in seeds]
    first_gaps = [arrival_times(1, 2.0, s)[0] for s in seeds]
    correlation = numpy.corrcoef(ranks(lengths), ranks(first_gaps))[0, 1]
    assert abs(correlation) < 0.3, correlation   # 6 standard errors of independent draws
    # Still reproducible from the seed.
    seed = seeds[0]
    assert arrival_times(5, 3.0, seed) == arrival_times(5, 3.0, seed)
    assert arrival_times(5, 3.0, seed) != arrival_times(5, 3.0, seed + 1)


class CountingTarget:
    """Counts the requests in flight; each yields a token per 5 ms."""

    def __init__(self) -> None:
        self.in_flight = self.most_in_flight = 0

    async def stream(self, request_id, prompt, max_tokens):
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            for count in range(1, max_tokens + 1):
                await asyncio.sleep(0.005)
                yield Counts(count, len(prompt))
        finally:
            self.in_flight -= 1

    def kv_usage(self):
        return None


def test_max_concurrency_bounds_the_requests_in_flight(rng):
    count = rng.randint(6, 12)
    limit = rng.randint(1, count - 2)
    target = CountingTarget()
    workload = random_workload(rng, count)
    result = asyncio.run(run_online(target, workload, float("inf"), max_concurrency=limit))
    summary = result.summary()
    assert target.most_in_flight == limit and summary["max_concurrency"] == limit
    assert summary["finished_requests"] == count
    # A request's arrival, from which its latencies count, is when it is sent, once fewer
    # than `limit` others are in flight, not when it started waiting for a slot.
    for record in result.records:
        in_flight = [other for other in result.records
                     if other is not record and other.arrival <= record.arrival < other.done]
        assert len(in_flight) < limit
    unlimited = CountingTarget()
    asyncio.run(run_online(unlimited, workload, float("inf")))
    assert unlimited.most_in_flight == count
    with pytest.raises(ValueError, match="max_concurrency=0 is invalid: must be >= 1"):
        asyncio.run(run_online(target, workload, 1.0, max_concurrency=0))
