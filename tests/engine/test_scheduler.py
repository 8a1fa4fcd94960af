"""Scheduler policy, driven directly: budget, chunking, decode priority, preemption, FCFS."""

import random
from collections import deque

import pytest

from shardline.config import SchedulerConfig
from shardline.step import ModelRunnerOutput
from shardline.engine.kv_blocks import KVBlockManager
from shardline.sampling_params import SamplingParams
from shardline.engine.scheduler import Scheduler
from shardline.engine.sequence import Sequence, SequenceStatus


pytestmark = pytest.mark.usefixtures("seeded_random")


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=32, chunked=True,
                   caching=False):
    kv = KVBlockManager(num_blocks, block_size, caching)
    return Scheduler(SchedulerConfig(max_num_seqs, budget, chunked), kv)


def add(sched, name, prompt_len, arrival, n=1):
    """Queue a request of `n` sequences (siblings share the prompt, led by the first)."""
    prompt = [random.randrange(50) for _ in range(prompt_len)]
    seqs = []
    for i in range(n):
        seq_id = name if n == 1 else f"{name}#{i}"
        seqs.append(Sequence(seq_id, name, i, prompt, SamplingParams(), arrival + i,
                             max_len=1000, prefix_leader=seqs[0] if seqs else None))
        sched.add(seqs[-1])
    return seqs[0] if n == 1 else seqs


def sampled_for(sched, out):
    """What running `out` gives: token 1 for each sequence whose prompt it completes or
    that it decodes (each sequence is in one step at a time)."""
    result = ModelRunnerOutput()
    for req in [*out.new_requests, *out.cached_requests]:
        seq = sched.seqs[req.req_id]
        if seq.num_computed_tokens + out.num_scheduled_tokens[req.req_id] == seq.num_tokens:
            result.req_ids.append(req.req_id)
            result.sampled_token_ids.append(1)
            result.logprobs.append(None)
    return result


def step(sched):
    """Schedule, pretend to run, record."""
    out = sched.schedule()
    sched.update(out, sampled_for(sched, out))
    return out


def test_budget_and_max_num_seqs_are_respected():
    sched = make_scheduler(max_num_seqs=3, budget=10)
    for i in range(6):
        add(sched, f"r{i}", random.randint(1, 25), i)
    for _ in range(30):
        out = step(sched)
        assert out.total_num_scheduled_tokens <= 10
        assert len(sched.running) <= 3
        sched.kv.check_invariants()


def test_chunked_prefill_splits_a_long_prompt():
    sched = make_scheduler(budget=16)
    seq = add(sched, "a", 50, 0)
    chunks = [step(sched).num_scheduled_tokens["a"] for _ in range(5)]
    assert chunks == [16, 16, 16, 2, 1]
    assert seq.output_token_ids == [1, 1]


def test_without_chunking_a_prompt_waits_for_a_whole_budget():
    sched = make_scheduler(budget=16, chunked=False)
    add(sched, "a", 10, 0)
    add(sched, "b", 10, 1)
    assert step(sched).num_scheduled_tokens == {"a": 10}
    assert step(sched).num_scheduled_tokens == {"a": 1, "b": 10}


def test_decodes_go_first_then_prefill_chunks_fill_the_budget():
    sched = make_scheduler(budget=8)
    add(sched, "a", 3, 0)
    add(sched, "b", 3, 1)
    step(sched)
    add(sched, "c", 20, 2)
    out = step(sched)
    assert list(out.num_scheduled_tokens.items()) == [("a", 1), ("b", 1), ("c", 6)]
    out = step(sched)
    assert list(out.num_scheduled_tokens.items()) == [("a", 1), ("b", 1), ("c", 6)]
    assert [r.req_id for r in out.cached_requests] == ["a", "b", "c"]


def test_waiting_requests_are_served_first_come_first_served():
    sched = make_scheduler(max_num_seqs=2, budget=64)
    for i in range(5):
        add(sched, f"r{i}", 4, i)
    started = []
    while sched.has_unfinished():
        out = step(sched)
        started += [r.req_id for r in out.new_requests]
        for seq in list(sched.running):
            if len(seq.output_token_ids) >= 2:
                sched.finish(seq, SequenceStatus.FINISHED_LENGTH)
    assert started == [f"r{i}" for i in range(5)]
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_preemption_takes_the_latest_arrival_and_resumes_it_first():
    sched = make_scheduler(num_blocks=6, block_size=4, budget=64)
    a, b, c = add(sched, "a", 7, 0), add(sched, "b", 7, 1), add(sched, "c", 7, 2)
    step(sched)  # each prompt fills 2 blocks
    for _ in range(2):
        out = step(sched)
    assert c.status is SequenceStatus.WAITING and c.num_preemptions == 1
    assert a.status is b.status is SequenceStatus.RUNNING
    assert "c" in out.finished_req_ids
    assert sched.waiting[0] is c
    add(sched, "d", 2, 3)
    sched.finish(a, SequenceStatus.FINISHED_STOPPED)
    before = list(c.token_ids)
    out = step(sched)
    resumed = out.new_requests[0]
    assert resumed.req_id == "c"
    assert resumed.prompt_token_ids + resumed.output_token_ids == before
    assert resumed.output_token_ids == [1, 1]
    assert out.num_scheduled_tokens["c"] == len(before)
    sched.kv.check_invariants()


def test_preemption_frees_budget_for_no_new_prefill_in_that_step():
    sched = make_scheduler(num_blocks=4, block_size=4, budget=64)
    add(sched, "a", 8, 0)
    add(sched, "b", 8, 1)
    step(sched)
    add(sched, "c", 1, 2)
    out = step(sched)
    assert "b" not in out.num_scheduled_tokens and "c" not in out.num_scheduled_tokens
    assert [s.seq_id for s in sched.waiting] == ["b", "c"]


def test_prefix_cache_hit_skips_computed_tokens():
    sched = make_scheduler(caching=True)
    a = add(sched, "a", 13, 0)
    step(sched)
    b = Sequence("b", "b", 0, a.prompt_token_ids[:12] + [3, 3], SamplingParams(), 1, 1000)
    sched.add(b)
    out = step(sched)
    new = out.new_requests[0]
    assert new.num_computed_tokens == 12 and out.num_scheduled_tokens["b"] == 2
    assert new.block_ids[:3] == sched.kv.block_table("a")[:3]
    assert sched.stats.num_cached_tokens == 12


def test_cached_tokens_reported_are_the_first_admissions_not_a_resumes():
    """A preempted sequence resumes from its own cached blocks; that hit is counted in the
    cache statistics but is not the request's prefix-cache hit."""
    sched = make_scheduler(num_blocks=7, block_size=4, budget=64, caching=True)
    prompt_len = random.randint(5, 8)
    a, b, c = (add(sched, name, prompt_len, i) for i, name in enumerate("abc"))
    while c.num_preemptions == 0:
        step(sched)
    sched.finish(a, SequenceStatus.FINISHED_STOPPED)
    hits_before = sched.stats.num_cached_tokens
    out = step(sched)
    assert out.new_requests[0].req_id == "c" and out.new_requests[0].num_computed_tokens > 0
    assert sched.stats.num_cached_tokens > hits_before
    assert c.num_cached_tokens == 0


def test_siblings_waiting_for_their_leader_do_not_stall_the_queue():
    sched = make_scheduler(num_blocks=64, block_size=4, budget=16, caching=True)
    leader, sibling = add(sched, "a", 40, 0, n=2)
    b = add(sched, "b", 4, 2)
    assert step(sched).num_scheduled_tokens == {"a#0": 16}
    assert step(sched).num_scheduled_tokens == {"a#0": 16}
    # The leader's last chunk leaves budget: b starts; the sibling keeps its place.
    assert step(sched).num_scheduled_tokens == {"a#0": 8, "b": 4}
    assert list(sched.waiting) == [sibling]
    later = add(sched, "c", 4, 3)
    out = step(sched)
    assert [r.req_id for r in out.new_requests] == ["a#1", "c"]
    assert out.new_requests[0].block_ids[:9] == sched.kv.block_table("a#0")[:9]
    assert sibling.num_cached_tokens == 36 and out.num_scheduled_tokens["a#1"] == 4
    assert b.status is later.status is SequenceStatus.RUNNING
    sched.kv.check_invariants()




def test_a_long_prompt_is_never_preempted_for_later_short_requests():
    """Two pipelined steps: while a long prompt's chunk is in flight, the next step admits
    short requests that arrived after it, and they then decode ahead of its next chunk.
    Short of blocks, the long prompt waits for them rather than start over, and they (being
    later) make room by preempting one another, so it is never preempted."""
    preemptions = 0
    for _ in range(20):
        sched = Scheduler(SchedulerConfig(8, 16, True), KVBlockManager(18, 4, False),
                          pipeline_depth=2)
        long = add(sched, "long", random.randint(48, 60), 0)
        wanted = {}
        in_flight = deque()
        for now in range(1, 100):
            if long.output_token_ids:
                break
            wanted[f"s{now}"] = random.randint(4, 10)
            add(sched, f"s{now}", random.randint(2, 6), now)
            out = sched.schedule()
            if not out.is_empty:
                in_flight.append((out, sampled_for(sched, out)))
            if len(in_flight) == 2 or (out.is_empty and in_flight):
                sched.update(*in_flight.popleft())
            for seq in list(sched.running):
                if (seq is not long and len(seq.output_token_ids) >= wanted[seq.seq_id]
                        and seq.seq_id not in sched._in_flight):
                    sched.finish(seq, SequenceStatus.FINISHED_LENGTH)
            sched.kv.check_invariants()
        assert long.output_token_ids, "the long prompt did not finish in 100 steps"
        assert long.num_preemptions == 0
        preemptions += sched.stats.num_preemptions
    assert preemptions > 0  # the cache was tight enough to preempt
