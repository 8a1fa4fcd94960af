"""The engine through the multi-process executor (CPU, gloo and shared-memory collectives,
fp32, tiny-llama at TP2, PP2 and world size 1): continuous batching, chunked prefill,
prefix caching, preemption, seeded sampling, aborts and AsyncLLM streaming give the tokens
of the one-rank in-process engine run on the same workload with the same options, with
one step in flight per stage and idle workers that sleep. Invalid layouts are in
test_llm_multiproc_layouts.py, dead workers and shutdown in test_llm_multiproc_failures.py.

Each layout starts its worker processes once per module (they take seconds to start), so
the feature tests share one multi-process LLM per layout and one in-process reference.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass

import psutil
import pytest

from shardline import LLM, SamplingParams
from shardline.executor.multiproc import MultiProcExecutor
from shardline.executor.uniproc import UniProcExecutor

from async_streams import assert_streams_match_one_rank
from engine_prompts import random_prompt, token_ids
from near_ties import assert_greedy_match, assert_sampled_match, outputs_run, sampled_run

MODEL = "tiny-llama"  # 4 heads, 2 KV heads, 2 layers
# A cache of 24 blocks of 4 tokens forces preemption; a budget of 16 tokens a step
# chunks every prompt longer than that.
ENGINE = dict(block_size=4, num_kv_blocks=24, max_num_batched_tokens=16, max_num_seqs=8,
              device="cpu")
LAYOUTS = {
    "tp2": dict(tensor_parallel_size=2),
    "mp-world1": dict(distributed_executor_backend="mp"),
    "tp2-async": dict(tensor_parallel_size=2, async_scheduling=True),
    "pp2": dict(pipeline_parallel_size=2),
}
# One rank in a worker process schedules ahead (async scheduling is on by default there):
# its reference does too, in process, so that both run the same steps. TP2 on the CPU
# does not by default; "tp2-async" asks for it (the sampled tokens then reach the other
# rank by broadcast).
REFERENCE = {"mp-world1": dict(async_scheduling=True), "tp2-async": dict(async_scheduling=True)}
TIMEOUT_S = 60.0
pytestmark = pytest.mark.usefixtures("no_process_left_behind")


@dataclass
class Pair:
    """One layout's multi-process LLM and the in-process one-rank LLM it must agree with;
    both have the same engine options, so they schedule the same steps."""

    layout: str
    reference: LLM
    llm: LLM

    @property
    def same_schedule(self) -> bool:
        """Whether the layout's scheduler runs the reference's steps: one step in flight in
        both, or both scheduling ahead (pipelined steps split the batch differently)."""
        mine, theirs = self.llm.engine.scheduler, self.reference.engine.scheduler
        return (mine.max_steps_in_flight, mine.schedule_ahead) == (
            theirs.max_steps_in_flight, theirs.schedule_ahead)


@pytest.fixture(scope="module", params=list(LAYOUTS))
def pair(request) -> Pair:
    reference = LLM(MODEL, **ENGINE, **REFERENCE.get(request.param, {}))
    try:
        llm = LLM(MODEL, **ENGINE, **LAYOUTS[request.param])
    except BaseException:
        reference.shutdown()
        raise
    try:
        assert isinstance(reference.engine.executor, UniProcExecutor)
        executor = llm.engine.executor
        assert isinstance(executor, MultiProcExecutor)
        assert len(executor.worker_pids) == executor.config.parallel.world_size
        # On by default for one CPU rank in a worker process, or when asked for.
        ahead = request.param in ("mp-world1", "tp2-async")
        assert llm.engine.scheduler.schedule_ahead == ahead
        yield Pair(request.param, reference, llm)
    finally:
        llm.shutdown()
        reference.shutdown()


def assert_all_free(llm: LLM) -> None:
    engine = llm.engine
    engine.kv.check_invariants()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    assert not engine.has_unfinished_requests()


class StatsDelta:
    """What the scheduler counted between construction and `__call__`."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.before = dataclasses.asdict(llm.stats)

    def __call__(self) -> dict[str, int]:
        return {k: v - self.before[k] for k, v in dataclasses.asdict(self.llm.stats).items()}


def run_both(pair: Pair, prompts, params) -> tuple[list, list, dict, dict]:
    """`generate` on the reference, then on the layout: outputs and stats deltas of each."""
    ref_delta, delta = StatsDelta(pair.reference), StatsDelta(pair.llm)
    expected = pair.reference.generate(prompts, params)
    got = pair.llm.generate(prompts, params)
    return expected, got, ref_delta(), delta()


def assert_same_schedule(pair: Pair, ref_stats: dict, stats: dict) -> None:
    """Where both schedule alike the executor is invisible to the scheduler: it must count
    the same steps, computed and cached tokens and preemptions as the reference."""
    if pair.same_schedule:
        assert stats == ref_stats


@dataclass
class Scripted:
    """A request of a scripted workload: added before step `join`, aborted before step
    `abort` when that is set."""

    req_id: str
    prompt: list[int]
    params: SamplingParams
    join: int
    abort: int | None = None


def drive(llm: LLM, script: list[Scripted]) -> tuple[dict, dict[str, int], dict[str, int]]:
    """Run `script` on the incremental API: the final output of every request, the step in
    which each request got its first token, and each aborted request's computed tokens
    when it was aborted."""
    final, first_token_step, computed_at_abort = {}, {}, {}
    last_event = max(max(r.join, r.abort or 0) for r in script)
    deadline = time.monotonic() + TIMEOUT_S
    step = 0
    while step <= last_event or llm.has_unfinished_requests():
        assert time.monotonic() < deadline, f"the workload did not finish in {TIMEOUT_S} s"
        for req in script:
            if req.join == step:
                llm.add_request(req.req_id, req.prompt, req.params)
            if req.abort == step:
                computed_at_abort[req.req_id] = \
                    llm.engine.scheduler.seqs[req.req_id].num_computed_tokens
                aborted = llm.abort_request(req.req_id)
                assert aborted is not None, f"{req.req_id} finished before its abort"
                final[req.req_id] = aborted
        for output in llm.step():
            if output.outputs[0].token_ids:
                first_token_step.setdefault(output.request_id, step)
            if output.finished:
                final[output.request_id] = output
        step += 1
    return final, first_token_step, computed_at_abort


def batching_workload(rng: random.Random) -> list[Scripted]:
    """Requests that join a running batch at different steps, two long prompts that take
    several steps to prefill at 16 tokens a step, one request aborted while prefilling and
    one while decoding."""
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=2)
    return [
        Scripted("long", random_prompt(rng, 33, 40), greedy, join=0),
        Scripted("short", random_prompt(rng, 3, 6), greedy, join=0),
        Scripted("abort-decode", random_prompt(rng, 3, 6), greedy, join=1, abort=6),
        Scripted("abort-prefill", random_prompt(rng, 36, 40), greedy, join=3, abort=5),
        Scripted("late", random_prompt(rng, 20, 30), greedy, join=4),
        Scripted("later", random_prompt(rng, 5, 12), greedy, join=7),
    ]


def test_continuous_batching_chunked_prefill_and_aborts_match_one_rank(pair, rng):
    script = batching_workload(rng)
    ref_delta, delta = StatsDelta(pair.reference), StatsDelta(pair.llm)
    expected, _, ref_computed = drive(pair.reference, script)
    got, first_token_step, computed = drive(pair.llm, script)
    # The script does what it says on the one-rank engine (16 prompt tokens a step).
    assert 0 < ref_computed["abort-prefill"] < len(script[3].prompt)
    assert ref_computed["abort-decode"] > len(script[2].prompt)
    wanted, outs = [], []
    for req in script:
        (want,), (out,) = outputs_run([expected[req.req_id]]), outputs_run([got[req.req_id]])
        reason = got[req.req_id].outputs[0].finish_reason
        assert reason == ("length" if req.abort is None else "abort"), req.req_id
        if req.abort is not None:
            # How far an aborted request got depends on the steps in flight at the abort.
            n = min(len(want[0]), len(out[0]))
            want, out = (want[0][:n], want[1][:n]), (out[0][:n], out[1][:n])
        wanted.append(want)
        outs.append(out)
    assert_greedy_match(wanted, outs)
    assert got["abort-prefill"].outputs[0].token_ids == []
    assert first_token_step["long"] >= 2  # 33+ prompt tokens at 16 a step
    if pair.same_schedule:
        assert computed == ref_computed
    assert_same_schedule(pair, ref_delta(), delta())
    assert_all_free(pair.llm)


def test_preemption_gives_the_one_rank_tokens(pair, rng):
    # Five sequences of 24 to 29 tokens need 6 to 8 blocks each, and the cache holds 24.
    prompts = [random_prompt(rng, 14, 19) for _ in range(5)]
    params = SamplingParams(temperature=0.0, max_tokens=11, ignore_eos=True, logprobs=2)
    expected, got, ref_stats, stats = run_both(pair, prompts, params)
    assert_greedy_match(outputs_run(expected), outputs_run(got))
    assert stats["num_preemptions"] > 0
    assert_same_schedule(pair, ref_stats, stats)
    assert_all_free(pair.llm)


def test_prefix_cache_hits_give_the_one_rank_tokens(pair, rng):
    shared = random_prompt(rng, 28, 28)  # 7 blocks
    tails = rng.sample(range(3, 259), 3)
    prompts = [shared + [tail] + random_prompt(rng, 1, 4) for tail in tails]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
    expected, got, ref_stats, stats = run_both(pair, prompts[:1], params)
    more_expected, more, more_ref_stats, more_stats = run_both(pair, prompts[1:], params)
    assert_greedy_match(outputs_run(expected + more_expected), outputs_run(got + more))
    assert [o.num_cached_tokens for o in more] == [28, 28]
    assert more_stats["num_cached_tokens"] == 56
    assert_same_schedule(pair, ref_stats, stats)
    assert_same_schedule(pair, more_ref_stats, more_stats)
    assert_all_free(pair.llm)


def test_seeded_sampling_gives_the_one_rank_tokens(pair, rng):
    prompts = [random_prompt(rng, 3, 20) for _ in range(4)]
    seeds = rng.sample(range(10**6), len(prompts))
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=s, max_tokens=10,
                             ignore_eos=True, logprobs=0) for s in seeds]
    expected, got, ref_stats, stats = run_both(pair, prompts, params)
    # Equal up to a near tie of a draw: the layout's arithmetic rounds apart.
    (want_run, drawn_with), (got_run, _) = (sampled_run(o, params) for o in (expected, got))
    assert_sampled_match(want_run, got_run, drawn_with, pair.llm.engine.vocab_size)
    reseeded = [dataclasses.replace(p, seed=p.seed + 1) for p in params]
    assert token_ids(pair.reference.generate(prompts, reseeded)) != token_ids(expected)
    assert_same_schedule(pair, ref_stats, stats)
    assert_all_free(pair.llm)


def test_async_llm_streams_the_one_rank_tokens(pair, rng):
    """Three streams at once over the multi-process engine; one consumer stops early, which
    aborts its request, and the others still stream every token of the one-rank run."""
    prompts = [random_prompt(rng, 4, 20) for _ in range(3)]
    assert_streams_match_one_rank(pair.llm, pair.reference, prompts)
    assert_all_free(pair.llm)


def test_the_engine_keeps_one_step_in_flight_per_stage(pair, rng):
    """PP2 keeps two steps in flight through the executor, each holding other sequences
    than the other (a sequence in a step not yet returned is not scheduled again); one
    stage keeps one, or two when it schedules ahead."""
    engine = pair.llm.engine
    depth = 2 if pair.layout == "pp2" or engine.scheduler.schedule_ahead else 1
    assert engine.scheduler.max_steps_in_flight == depth
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    for i in range(4):
        pair.llm.add_request(f"depth-{i}", random_prompt(rng, 3, 12), params)
    peak, deadline = 0, time.monotonic() + TIMEOUT_S
    while pair.llm.has_unfinished_requests():
        assert time.monotonic() < deadline, f"the requests did not finish in {TIMEOUT_S} s"
        engine.send_steps()
        peak = max(peak, engine.num_steps_in_flight)
        if not engine.scheduler.schedule_ahead:
            ids = [set(step.num_scheduled_tokens) for step, _ in engine._in_flight]
            assert all(not (a & b) for i, a in enumerate(ids) for b in ids[i + 1:]), ids
        engine.collect_step()
    assert peak == depth
    assert_all_free(pair.llm)


def test_idle_workers_use_no_cpu_between_requests(pair, rng):
    """After a generate, the model workers (torch, the process groups, the shared-memory
    collectives) sleep until the next step: under 0.05 s of CPU each in a second."""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    pair.llm.generate([random_prompt(rng, 4, 20) for _ in range(3)], params)
    time.sleep(0.3)
    procs = [psutil.Process(pid) for pid in pair.llm.engine.executor.worker_pids]
    before = [sum(p.cpu_times()[:2]) for p in procs]
    time.sleep(1.0)
    used = [sum(p.cpu_times()[:2]) - b for p, b in zip(procs, before)]
    assert max(used) < 0.05, f"idle workers used {used} s of CPU in 1 s"
