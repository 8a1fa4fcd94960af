"""The Worker driven directly with hand-built SchedulerOutputs."""

import msgpack
import pytest
import torch

from shardline.step import (CachedRequestData, CachedRequests, ModelRunnerOutput,
                            NewRequestData, SchedulerOutput)
from shardline.sampling_params import SamplingParams
from near_ties import assert_greedy_match, driver_run
from worker_driver import WorkerDriver, make_worker


@pytest.fixture(scope="module")
def worker():
    return make_worker("tiny-qwen2", block_size=4, num_blocks=512)


def _prompts(n: int, lo: int = 3, hi: int = 30) -> list[list[int]]:
    return [torch.randint(3, 259, (int(torch.randint(lo, hi, (1,))),)).tolist()
            for _ in range(n)]


def test_greedy_is_batch_and_chunk_invariant(worker, fresh_seed):
    prompts = _prompts(16)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, logprobs=2)
    batched = WorkerDriver(worker).generate(prompts, greedy, token_budget=24)
    alone = WorkerDriver(worker).generate(prompts[:1], greedy, token_budget=1000)
    assert_greedy_match(driver_run(*alone), driver_run(*batched)[:1])
    assert len({tuple(t) for t in batched[0]}) > 1


def test_seeded_sampling_ignores_batch_mates(worker, fresh_seed):
    prompts = _prompts(4)
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=10)
    alone, _ = WorkerDriver(worker).generate(prompts[:1], seeded)
    mates = [SamplingParams(temperature=1.0, max_tokens=10)] * 3
    together, _ = WorkerDriver(worker).generate(_prompts(3) + prompts[:1], mates + [seeded],
                                                token_budget=16)
    assert together[3] == alone[0]
    # Another seed samples other tokens: checked over four prompts, since one prompt can
    # leave the model next to no choice (3% of them give the same 10 tokens for any seed).
    by_seed = [WorkerDriver(worker).generate(prompts, SamplingParams(seed=seed, max_tokens=10))[0]
               for seed in (1234, 99)]
    assert by_seed[0] != by_seed[1]


def _step(worker, new=(), cached=(), scheduled=None, finished=()) -> ModelRunnerOutput:
    so = SchedulerOutput(list(new), CachedRequests.of(cached), scheduled or {}, list(finished))
    return worker.execute_model(SchedulerOutput.from_dict(
        msgpack.unpackb(msgpack.packb(so.to_dict()))))


def test_resume_after_preemption_and_prefix_hit_give_same_tokens(worker):
    prompt = torch.randint(3, 259, (10,)).tolist()
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=4).to_dict()
    tokens = []
    out = _step(worker, new=[NewRequestData("a", prompt, [], params, [0, 1, 2, 3], 0)],
                scheduled={"a": 10})
    tokens.append(out.sampled_token_ids[0])
    for step in range(3):
        n = 10 + len(tokens)
        out = _step(worker, cached=[CachedRequestData("a", tokens[-1:], [], n - 1)],
                    scheduled={"a": 1})
        tokens.append(out.sampled_token_ids[0])
    # Preempted after two outputs, resumed into other blocks: recompute prompt + outputs.
    out = _step(worker, new=[NewRequestData("a", prompt, tokens[:2], params, [7, 8, 9, 10], 0)],
                scheduled={"a": 12}, finished=["a"])
    assert out.req_ids == ["a"] and out.sampled_token_ids[0] == tokens[2]
    # A second request sharing the first 8 prompt tokens (2 cached blocks) computes the rest.
    out = _step(worker, new=[NewRequestData("b", prompt, [], params, [7, 8, 11], 8)],
                scheduled={"b": 2}, finished=["a"])
    assert out.req_ids == ["b"] and out.sampled_token_ids[0] == tokens[0]


def test_only_completed_prefills_sample_and_order_follows_schedule(worker):
    params = SamplingParams(temperature=0.0, logprobs=2).to_dict()
    p1, p2 = _prompts(1, 9, 10)[0], _prompts(1, 5, 6)[0]
    out = _step(worker, new=[NewRequestData("x", p1, [], params, [20, 21, 22], 0),
                             NewRequestData("y", p2, [], params, [23, 24], 0)],
                scheduled={"x": 4, "y": 5})
    assert out.req_ids == ["y"]
    assert out.logprobs[0].sampled_logprob == pytest.approx(out.logprobs[0].top_logprobs[0])
    out = _step(worker, cached=[CachedRequestData("y", out.sampled_token_ids, [], 5),
                                CachedRequestData("x", [], [], 4)],
                scheduled={"x": 5, "y": 1})
    assert out.req_ids == ["y", "x"]
    _step(worker, finished=["x", "y"])
    assert "x" not in worker.model_runner.requests


def test_cached_request_unknown_is_an_error(worker):
    with pytest.raises(KeyError, match="'ghost'"):
        _step(worker, cached=[CachedRequestData("ghost", [1], [], 3)], scheduled={"ghost": 1})


def test_kv_blocks_from_memory_budget():
    w = make_worker("tiny-llama", block_size=8, num_blocks=4)
    w.config.cache.num_blocks = None
    w.config.cache.kv_cache_memory_bytes = 10 * 2 * 2 * 8 * 2 * 32 * 4   # 10 blocks
    assert w.determine_num_kv_blocks() == 10
    w.config.cache.kv_cache_memory_bytes = 100
    with pytest.raises(ValueError, match="kv_cache_memory_bytes=100 is too small"):
        w.determine_num_kv_blocks()
