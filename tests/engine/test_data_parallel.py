"""Data parallelism over worker processes (CPU, gloo and shared-memory collectives, fp32,
tiny-llama): DP2 and DP2 x TP2 give the greedy and seeded tokens of the one-rank engine,
with every core serving; AsyncLLM streams under DP2; aborts reach the right core; dummy
steps run a forward on every rank of an idle core, and keep expert parallelism across two
cores (tiny-mixtral) in step while one core idles; invalid flags are refused before any
process starts; a worker that dies in one core, at startup or while serving, fails the
whole engine with an error naming it, and leaves no process and no segment behind; every
core's ranks meet at one private file store, gone once the engine is (shut down, failed to
start, or a worker killed).

Each layout starts its worker processes once per module (they take seconds to start).
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import time

import pytest
import torch

from shardline import LLM, SamplingParams
from shardline.engine.data_parallel import DataParallelEngine, create_engine
from shardline.engine.engine_args import EngineArgs
from shardline.executor import EngineDeadError
from shardline.worker.worker import Worker

from async_streams import assert_streams_match_one_rank
from engine_prompts import random_prompt, token_ids
from near_ties import MOE_TOP, assert_greedy_match, assert_sampled_match, outputs_run, sampled_run
from process_hygiene import (assert_gone, kill_while_stepping, leaked_segments, live_children,
                             shm_segments)

MODEL = "tiny-llama"  # 4 heads, 2 KV heads, 2 layers
ENGINE = dict(block_size=4, num_kv_blocks=32, max_num_batched_tokens=16, max_num_seqs=8,
              device="cpu")
LAYOUTS = {"dp2": dict(data_parallel_size=2),
           "dp2xtp2": dict(data_parallel_size=2, tensor_parallel_size=2)}
TIMEOUT_S = 60.0
pytestmark = pytest.mark.usefixtures("no_process_left_behind")


@pytest.fixture(scope="module")
def reference() -> LLM:
    with LLM(MODEL, **ENGINE) as llm:
        yield llm


@pytest.fixture(scope="module", params=list(LAYOUTS))
def dp_llm(request) -> LLM:
    with LLM(MODEL, **ENGINE, **LAYOUTS[request.param]) as llm:
        engine = llm.engine
        assert isinstance(engine, DataParallelEngine) and len(engine.cores) == 2
        pids = [core.executor.worker_pids for core in engine.cores]
        assert [len(p) for p in pids] == [LAYOUTS[request.param].get("tensor_parallel_size",
                                                                       1)] * 2
        yield llm


def steps_per_core(llm: LLM) -> list[int]:
    return [core.stats.num_steps for core in llm.engine.cores]


def assert_all_free(llm: LLM) -> None:
    assert not llm.has_unfinished_requests()
    for core in llm.engine.cores:
        core.kv.check_invariants()
        assert core.kv.num_free_blocks == core.kv.num_blocks


def rendezvous_dir(llm: LLM) -> str:
    """The private directory of the one file store where every core's ranks met."""
    [rendezvous] = {core.executor._group.rendezvous for core in llm.engine.cores}
    assert rendezvous.url == f"file://{rendezvous.directory}/store"
    assert stat.S_IMODE(os.stat(rendezvous.directory).st_mode) == 0o700
    return rendezvous.directory


def test_the_cores_rendezvous_at_one_private_file_store_gone_with_the_engine():
    with LLM(MODEL, data_parallel_size=2, **ENGINE) as llm:
        where = rendezvous_dir(llm)
    assert not os.path.exists(where)


def test_greedy_tokens_match_one_rank_with_every_core_serving(dp_llm, reference, rng):
    """Prompts longer than the 16-token budget (chunked prefill) and more KV than a core
    holds at once (preemption), in request order."""
    prompts = [random_prompt(rng, 3, 40) for _ in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=2)
    expected = reference.generate(prompts, params)
    before = steps_per_core(dp_llm)
    got = dp_llm.generate(prompts, params)
    assert [o.prompt_token_ids for o in got] == prompts
    assert_greedy_match(outputs_run(expected), outputs_run(got))
    assert all(after > b for after, b in zip(steps_per_core(dp_llm), before))
    assert_all_free(dp_llm)


def test_seeded_sampling_gives_the_same_tokens_on_whichever_core(dp_llm, reference, rng):
    prompts = [random_prompt(rng, 3, 20) for _ in range(4)]
    params = [SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=rng.randrange(10**6),
                             max_tokens=8, ignore_eos=True, logprobs=2) for _ in prompts]
    expected = reference.generate(prompts, params)
    # Reversed, each request is served by another core than in the first order.
    got = dp_llm.generate(prompts[::-1], params[::-1])[::-1]
    # Equal up to a near tie of a draw: the cores' batches round apart from the reference's.
    (want_run, drawn_with), (got_run, _) = (sampled_run(o, params) for o in (expected, got))
    assert_sampled_match(want_run, got_run, drawn_with, dp_llm.engine.vocab_size)
    for want, out in zip(expected, got):
        if out.outputs[0].token_ids == want.outputs[0].token_ids:
            assert out.outputs[0].cumulative_logprob == pytest.approx(
                want.outputs[0].cumulative_logprob, rel=1e-4)
    reseeded = [dataclasses.replace(p, seed=p.seed + 1) for p in params]
    assert token_ids(dp_llm.generate(prompts, reseeded)) != token_ids(expected)
    assert_all_free(dp_llm)


@pytest.mark.parametrize("request_id", [("a", 1), ["b"], 7])
def test_an_id_that_is_no_string_is_refused_by_name(dp_llm, request_id):
    with pytest.raises(ValueError, match=r"request_id=.* is invalid"):
        dp_llm.add_request(request_id, [5, 6, 7], SamplingParams(max_tokens=2))
    assert not dp_llm.has_unfinished_requests()


def test_abort_stops_the_request_on_its_core(dp_llm, reference, rng):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    prompts = [random_prompt(rng, 4, 10) for _ in range(4)]
    expected = outputs_run(reference.generate(prompts, params))
    for i, prompt in enumerate(prompts):
        dp_llm.add_request(f"a{i}", prompt, params)
    owners = [next(c for c, core in enumerate(dp_llm.engine.cores)
                   if f"a{i}" in core.outputs.requests) for i in range(4)]
    loads, least_loaded = [0, 0], []
    for prompt in prompts:
        core = min((0, 1), key=lambda c: (loads[c], c))
        least_loaded.append(core)
        loads[core] += len(prompt)
    assert owners == least_loaded
    victim = owners.index(1)
    final = {}
    for _ in range(3):
        final.update({o.request_id: o for o in dp_llm.step() if o.finished})
    aborted = dp_llm.abort_request(f"a{victim}")
    assert aborted.outputs[0].finish_reason == "abort"
    deadline = time.monotonic() + TIMEOUT_S
    while dp_llm.has_unfinished_requests():
        assert time.monotonic() < deadline
        final.update({o.request_id: o for o in dp_llm.step() if o.finished})
    assert sorted(final) == sorted(f"a{i}" for i in range(4) if i != victim)
    final[f"a{victim}"] = aborted
    got = outputs_run([final[f"a{i}"] for i in range(4)])
    done = len(got[victim][0])
    expected[victim] = (expected[victim][0][:done], expected[victim][1][:done])
    assert_greedy_match(expected, got)
    assert_all_free(dp_llm)


def test_async_llm_streams_under_data_parallelism(dp_llm, reference, rng):
    """Four streams at once, two per core; one consumer stops early, which aborts its
    request, and the others stream every token of the one-rank run."""
    prompts = [random_prompt(rng, 4, 20) for _ in range(4)]
    assert_streams_match_one_rank(dp_llm, reference, prompts)
    assert_all_free(dp_llm)


def test_dummy_steps_run_a_forward_on_every_rank_of_the_idle_core(dp_llm, reference, rng):
    """One request, so one core idles; with dummy steps on (as under expert parallelism)
    the idle core runs one dummy step per step of the busy one, a forward on each of its
    ranks (under TP2 its all-reduces are counted), and the tokens do not change."""
    engine = dp_llm.engine
    prompt = random_prompt(rng, 4, 12)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)
    expected = outputs_run(reference.generate([prompt], params))
    engine.collective_rpc("comm_stats", kwargs={"reset": True})
    before, dummies_before = steps_per_core(dp_llm), engine.num_dummy_steps
    engine.dummy_steps = True
    try:
        got = outputs_run(dp_llm.generate([prompt], params))
    finally:
        engine.dummy_steps = False
    assert_greedy_match(expected, got)   # TP2 sums its partial products in another order
    steps = [after - b for after, b in zip(steps_per_core(dp_llm), before)]
    idle = steps.index(0)
    assert engine.num_dummy_steps - dummies_before == steps[1 - idle] > 0
    if engine.config.parallel.tensor_parallel_size == 2:
        stats = engine.cores[idle].collective_rpc("comm_stats")
        layers = 2
        for rank_stats in stats:
            calls = rank_stats["tp"]["calls"]
            assert calls.get("all_reduce", 0) >= 2 * layers * steps[1 - idle], rank_stats
    assert_all_free(dp_llm)


def test_expert_parallel_over_two_cores_matches_one_rank_with_a_core_idle(rng):
    """tiny-mixtral, DP2 with EP: the experts are spread over both cores' ranks, whose
    all-to-alls pair up step by step. A batch for both cores, then one request alone while
    the other core runs dummy steps: the one-rank greedy tokens each time, and both ranks
    make the same number of all-to-all calls."""
    moe = dict(ENGINE, num_kv_blocks=48)
    prompts = [random_prompt(rng, 3, 30) for _ in range(5)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=MOE_TOP)
    with LLM("tiny-mixtral", **moe) as reference:
        expected = outputs_run(reference.generate(prompts, params))
    with LLM("tiny-mixtral", data_parallel_size=2, enable_expert_parallel=True,
             **moe) as llm:
        assert llm.engine.dummy_steps
        llm.engine.collective_rpc("comm_stats", kwargs={"reset": True})
        assert_greedy_match(expected, outputs_run(llm.generate(prompts, params)), moe=True)
        dummies = llm.engine.num_dummy_steps
        assert_greedy_match(expected[:1], outputs_run(llm.generate(prompts[:1], params)),
                            moe=True)
        assert llm.engine.num_dummy_steps - dummies >= params.max_tokens
        calls = [stats["world+dp+ep"]["calls"]["all_to_all"]
                 for stats in llm.engine.collective_rpc("comm_stats")]
        assert calls[0] == calls[1] > 0


INVALID = {
    "sp3": (dict(sequence_parallel_size=3),
            r"tensor_parallel_size=1 x sequence_parallel_size=3 = 3 does not divide the "
            r"model's 4 attention heads: use a product in \[1, 2, 4\]"),
    "sp4-tp2": (dict(sequence_parallel_size=4, tensor_parallel_size=2),
                r"tensor_parallel_size=2 x sequence_parallel_size=4 = 8 does not "
                r"divide the model's 4 attention heads"),
    "sp0": (dict(sequence_parallel_size=0),
            r"sequence_parallel_size=0 is invalid: must be an integer >= 1"),
    "dp0": (dict(data_parallel_size=0), r"data_parallel_size=0 is invalid: must be an integer"),
    "dp2-uni": (dict(data_parallel_size=2, distributed_executor_backend="uni"),
                r"distributed_executor_backend='uni' runs one rank, but the layout has "
                r"world_size=2: use 'mp'"),
    "dp2-tp3": (dict(data_parallel_size=2, tensor_parallel_size=3),
                r"tensor_parallel_size=3 does not divide the model's 4 attention heads"),
    "ep-dense-one-rank": (dict(enable_expert_parallel=True),
                          r"enable_expert_parallel=True, but LlamaForCausalLM is a dense model "
                          r"with no experts to split"),
    "ep-not-bool": (dict(enable_expert_parallel="yes"),
                    r"enable_expert_parallel='yes' is invalid: must be True or False"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_flags_are_refused_before_any_process_starts(case, no_spawn):
    options, message = INVALID[case]
    with pytest.raises(ValueError, match=message):
        LLM(MODEL, device="cpu", **options)


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="this machine has a GPU")
def test_dp2_on_cuda_without_a_gpu_is_refused_before_any_process_starts(no_spawn):
    with pytest.raises(ValueError, match=r"device='cuda' .* but torch sees no GPU"):
        LLM(MODEL, device="cuda", data_parallel_size=2)


class FailsOnRank1(Worker):
    """Global rank 1 (data-parallel core 1 under DP2) fails to join the grid, while rank 0
    waits for it in the rendezvous."""

    def init_device(self) -> None:
        if self.rank == 1:
            raise RuntimeError(f"rank 1 cannot start at {self.distributed_init_method}")
        super().init_device()


def test_a_core_that_fails_to_start_stops_every_core():
    segments_before, children_before = shm_segments(), set(live_children())
    started = time.monotonic()
    config = EngineArgs(MODEL, data_parallel_size=2, **ENGINE).to_config()
    config.parallel.worker_cls = "test_data_parallel.FailsOnRank1"
    with pytest.raises(RuntimeError, match=r"init_device failed on worker rank 1: "
                                           r"RuntimeError: rank 1 cannot start at file://"
                                           ) as raised:
        create_engine(config)
    assert time.monotonic() - started < TIMEOUT_S
    where = re.search(r"file://(\S+)/store", str(raised.value)).group(1)
    assert not os.path.exists(where)
    assert set(live_children()) <= children_before
    assert not leaked_segments(segments_before)


def test_a_killed_worker_of_either_core_raises_engine_dead_and_leaves_nothing(rng):
    """SIGKILL of the worker of core 1 (global rank 1) while both cores generate: a step
    within 5 s raises EngineDeadError naming it, later steps too, and shutdown leaves no
    process and no segment behind."""
    segments_before = shm_segments()
    llm = LLM(MODEL, data_parallel_size=2, device="cpu", block_size=4, num_kv_blocks=256)
    pids = [pid for core in llm.engine.cores for pid in core.executor.worker_pids]
    where = rendezvous_dir(llm)
    dead = rf"worker rank 1 \(pid {pids[1]}\) died with exit code -9"
    try:
        params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        for i in range(4):
            llm.add_request(f"r{i}", random_prompt(rng, 4, 8), params)
        for _ in range(3):
            assert llm.step()
        assert kill_while_stepping(llm, pids[1], dead, TIMEOUT_S) < 5.0
        with pytest.raises(EngineDeadError, match=dead):
            llm.step()
    finally:
        llm.shutdown()
    assert_gone(pids)
    assert not leaked_segments(segments_before)
    assert not os.path.exists(where)
