"""Randomized workloads through the scheduler, the KV block manager and the output
processor, on the fake model: random prompts (some sharing prefixes), n > 1, max_tokens,
stop tokens and strings, requests arriving and aborted at random steps, a KV cache tight
enough to preempt, a budget small enough to chunk prefills, and steps in flight (pipelined
or scheduled ahead). Every step is checked against the bookkeeping invariants, and every
request that was not aborted must finish exactly as it does in an engine with room for all
of them, one step at a time."""

from __future__ import annotations

import random

import pytest

from fake_model import VOCAB, PieceTokenizer, make_engine
from shardline.engine.kv_blocks import _ROOT_HASH, hash_block
from shardline.sampling_params import SamplingParams

NUM_WORKLOADS = 120
# Stop strings that tokens complete often, alone, across tokens, or two in one token.
STOP_STRINGS = ["b", "ab", "ca", "cc", "bab", "abc"]


def random_workload(rng: random.Random) -> tuple[dict, list[tuple[int, str, list[int],
                                                                 SamplingParams]]]:
    """Engine limits and the requests: (arrival step, request id, prompt, params)."""
    block_size = rng.choice([1, 2, 4, 8])
    bases = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 24))] for _ in range(3)]
    requests = []
    for i in range(rng.randint(4, 14)):
        base = rng.choice(bases) if rng.random() < 0.6 else []
        tail = [rng.randrange(VOCAB) for _ in range(rng.randint(0 if base else 1, 20))]
        params = SamplingParams(
            n=rng.choice([1, 1, 1, 2, 3]), temperature=rng.choice([0.0, 0.8]),
            seed=rng.randrange(1000), max_tokens=rng.choice([None, *range(1, 21)]),
            stop_token_ids=[rng.randrange(VOCAB)] if rng.random() < 0.3 else [],
            stop=(rng.sample(STOP_STRINGS, rng.randint(1, 2)) if rng.random() < 0.3 else []),
            ignore_eos=rng.random() < 0.3, logprobs=rng.choice([None, 2]),
            frequency_penalty=rng.choice([0.0, 0.0, 0.5]))
        request_id = f"r{rng.randrange(4)}" if rng.random() < 0.2 else f"u{i}"
        requests.append((rng.randint(0, 12), request_id, base + tail, params))
    max_model_len = max(len(p) for _, _, p, _ in requests) + rng.randint(1, 24)
    # KV for every token but the last sampled one, of the longest sequence.
    longest = max(min(max_model_len, len(p) + (sp.max_tokens or max_model_len)) - 1
                  for _, _, p, sp in requests)
    needed = -(-longest // block_size)
    mode = rng.choice(["plain", "pipelined", "ahead"])
    chunked = rng.random() < 0.8
    max_num_seqs = rng.randint(1, 8)
    limits = dict(
        block_size=block_size, num_blocks=rng.randint(needed, needed * 2),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max(max_num_seqs, rng.randint(2, 24) if chunked
                                   else max(len(p) for _, _, p, _ in requests)),
        enable_chunked_prefill=chunked, enable_prefix_caching=rng.random() < 0.8,
        eos_token_ids=(0,), max_model_len=max_model_len,
        pipeline_depth=rng.randint(2, 3) if mode == "pipelined" else 1,
        async_scheduling=mode == "ahead", tokenizer=PieceTokenizer())
    return limits, requests


def completions(output):
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs)
            for c in output.outputs]


def check_completion(completion, prompt: list[int], params: SamplingParams,
                     max_model_len: int) -> None:
    """One finished completion against the stop conditions, worked out from its tokens
    alone: the earliest condition met ends it, and its text is the decoded tokens cut
    before a stop string (the stop token is not part of the text)."""
    token_ids, text, reason, stop_reason, _ = completion
    ends = set(params.stop_token_ids) | (set() if params.ignore_eos else {0})
    assert not ends & set(token_ids[:-1]), completion
    by_token = token_ids[-1] in ends
    decode = PieceTokenizer().decode
    full = decode(token_ids[:-1] if by_token else token_ids)
    hits = [(full.find(stop), stop) for stop in params.stop if stop in full]
    if hits:
        pos, stop = min(hits)
        assert (text, reason, stop_reason) == (full[:pos], "stop", stop), completion
        # It ends in the last token's text: one that ended before would have stopped it.
        assert not by_token and pos + len(stop) > len(decode(token_ids[:-1])), completion
        return
    assert text == full, completion
    if by_token:
        expected = token_ids[-1] if token_ids[-1] in params.stop_token_ids else None
        assert (reason, stop_reason) == ("stop", expected), completion
    else:
        assert reason == "length" and stop_reason is None, completion
        assert (len(token_ids) == params.max_tokens
                or len(prompt) + len(token_ids) == max_model_len), completion


def expected_outputs(requests, max_model_len: int) -> list:
    """Each request's completions in an engine with room for all of them at once."""
    engine = make_engine(num_blocks=4096, block_size=4, max_num_seqs=256,
                         max_num_batched_tokens=8192, eos_token_ids=(0,),
                         max_model_len=max_model_len, async_scheduling=False,
                         tokenizer=PieceTokenizer())
    results = {}
    for i, (_, _, prompt, params) in enumerate(requests):
        engine.add_request(str(i), prompt, params)
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                results[output.request_id] = completions(output)
    return [results[str(i)] for i in range(len(requests))]


class StepChecker:
    """Wraps the fake executor: checks each step as it is sent, and the whole engine's
    bookkeeping after every engine step."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.block_contents: dict[bytes, tuple[int, ...]] = {}
        executor = engine.executor
        self._send = executor.execute_model
        executor.execute_model = self.execute_model
        self._schedule = engine.scheduler.schedule
        engine.scheduler.schedule = self.schedule

    def schedule(self):
        """A sequence preempted in a step arrived after every sequence in that step."""
        sched = self.engine.scheduler
        before = {seq.seq_id: seq.num_preemptions for seq in sched.running}
        scheduled = self._schedule()
        arrivals = [sched.seqs[seq_id].arrival for seq_id in scheduled.num_scheduled_tokens]
        for seq in sched.waiting:
            if seq.num_preemptions > before.get(seq.seq_id, seq.num_preemptions):
                assert seq.arrival > max(arrivals, default=seq.arrival - 1), seq
        return scheduled

    def execute_model(self, scheduled, non_block=False):
        engine, sched, kv = self.engine, self.engine.scheduler, self.engine.kv
        config = sched.config
        assert 0 < scheduled.total_num_scheduled_tokens <= config.max_num_batched_tokens
        assert len(scheduled.num_scheduled_tokens) <= config.max_num_seqs
        assert len(sched.running) <= config.max_num_seqs
        busy = [seq_id for step, _ in engine._in_flight for seq_id in step.num_scheduled_tokens]
        for seq_id in scheduled.num_scheduled_tokens:
            # In at most one step unless scheduling ahead, then in at most two.
            assert busy.count(seq_id) < (2 if sched.schedule_ahead else 1), seq_id
        states = engine.executor.states
        for req in [*scheduled.new_requests, *scheduled.cached_requests]:
            start = (req.num_computed_tokens if req in scheduled.new_requests
                     else states[req.req_id]["computed"])
            count = scheduled.num_scheduled_tokens[req.req_id]
            seq = sched.seqs[req.req_id]
            if not config.enable_chunked_prefill and not seq.num_preemptions:
                # Unchunked, a prompt is computed whole (after its cached prefix).
                assert start + count >= seq.num_tokens, (seq, start, count)
            table = kv.block_table(req.req_id)
            assert len(table) * kv.block_size >= start + count, (req.req_id, table)
            for block in table[start // kv.block_size:(start + count - 1) // kv.block_size + 1]:
                # A block this step writes is nobody else's, and no cache entry's.
                assert kv.ref_counts[block] == 1, (req.req_id, block)
                assert kv.block_hash[block] is None, (req.req_id, block)
        return self._send(scheduled, non_block)

    def check(self) -> None:
        engine, sched, kv = self.engine, self.engine.scheduler, self.engine.kv
        kv.check_invariants()
        assert kv.num_free_blocks + sum(c > 0 for c in kv.ref_counts) == kv.num_blocks
        in_flight = {seq_id for step, _ in engine._in_flight
                     for seq_id in step.num_scheduled_tokens}
        assert set(sched._in_flight) == in_flight
        assert set(kv.tables) <= set(sched.seqs) | sched._retired
        assert sched._retired <= in_flight
        cache = engine.executor.cache
        for seq in sched.seqs.values():
            if seq.seq_id in sched._retired:  # a finished one's step holds the id
                assert seq in sched.waiting and not seq.num_tokens_in_flight, seq
            else:
                assert (seq.num_tokens_in_flight > 0) == (seq.seq_id in in_flight), seq
            table = kv.block_table(seq.seq_id)
            if seq in sched.waiting:  # its blocks are freed, or the finished one's
                assert not (table and seq.seq_id not in sched._retired), seq
                assert not seq.num_tokens_in_flight, seq
                continue
            assert seq in sched.running, seq
            assert seq.num_computed_tokens + seq.num_tokens_in_flight <= seq.num_tokens + 1
            assert len(table) >= kv.blocks_needed(seq.num_computed_tokens
                                                  + seq.num_tokens_in_flight)
            parent = _ROOT_HASH
            for i in range(kv.num_hashed.get(seq.seq_id, 0)):
                tokens = seq.token_ids[i * kv.block_size:(i + 1) * kv.block_size]
                parent = hash_block(parent, tokens)
                block = table[i]
                assert kv.block_hash[block] in (None, parent), (seq, i)
                if kv.block_hash[block] is not None:
                    assert cache[block] == tokens, (seq, i, block)
        # A cache key always names the same tokens, whichever block holds them.
        for key, block in kv.cached.items():
            held = tuple(cache[block])
            assert self.block_contents.setdefault(key, held) == held, block


def run_workload(limits, requests, rng):
    """Add each request at its step (or, once a request is aborted, sometimes the next one
    at once under its id), abort one now and then, and step until all are done; the
    finished completions by request index, the aborted indexes, and the engine."""
    engine = make_engine(**limits)
    checker = StepChecker(engine)
    finished: dict[int, list] = {}
    live: dict[str, int] = {}
    streamed: dict[str, list] = {}
    aborted = set()
    pending = sorted(range(len(requests)), key=lambda i: requests[i][0])
    step = 0
    while pending or engine.has_unfinished_requests():
        assert step < 2000, f"no progress: {engine.stats}"
        while pending and requests[pending[0]][0] <= step:
            i = pending[0]
            request_id = requests[i][1]
            if request_id in live:  # its id is in use: retry next step
                break
            pending.pop(0)
            engine.add_request(request_id, requests[i][2], requests[i][3])
            live[request_id] = i
        if live and rng.random() < 0.05:
            request_id = rng.choice(sorted(live))
            output = engine.abort_request(request_id)
            assert output.request_id == request_id and output.finished
            assert "abort" in [c.finish_reason for c in output.outputs]
            aborted.add(live.pop(request_id))
            streamed.pop(request_id, None)
            if pending and rng.random() < 0.5:  # the next request takes the id at once
                i = pending.pop(0)
                engine.add_request(request_id, requests[i][2], requests[i][3])
                live[request_id] = i
            checker.check()
        for output in engine.step():
            check_growth(streamed.get(output.request_id), output)
            streamed[output.request_id] = completions(output)
            if output.finished:
                finished[live.pop(output.request_id)] = streamed.pop(output.request_id)
        checker.check()
        step += 1
    assert not live
    assert kv_all_free(engine)
    return finished, aborted, engine


def check_growth(before: list | None, output) -> None:
    """A request's next output extends its last one: more tokens (and their logprobs) and
    more text, even when a stop string cuts the text at the end (what could begin one is
    never shown early); a finished completion stays as it was."""
    for i, (token_ids, text, reason, stop_reason, logprobs) in enumerate(completions(output)):
        assert logprobs is None or len(logprobs) == len(token_ids)
        if before is None:
            continue
        old_ids, old_text, old_reason = before[i][:3]
        if old_reason is not None:
            assert before[i] == completions(output)[i]
            continue
        assert list(token_ids[:len(old_ids)]) == list(old_ids) and len(token_ids) >= len(old_ids)
        assert text.startswith(old_text), (old_text, text, stop_reason)


def kv_all_free(engine) -> bool:
    sched = engine.scheduler
    return (engine.kv.num_free_blocks == engine.kv.num_blocks and not engine.kv.tables
            and not sched._in_flight and not sched._retired and not sched.seqs)


@pytest.mark.parametrize("workload", range(NUM_WORKLOADS))
def test_random_workloads_keep_invariants_and_match_an_unconstrained_run(workload, fresh_seed):
    rng = random.Random(f"{fresh_seed}-{workload}")
    limits, requests = random_workload(rng)
    finished, aborted, engine = run_workload(limits, requests, rng)
    expected = expected_outputs(requests, limits["max_model_len"])
    assert set(finished) | aborted == set(range(len(requests)))
    for i, output in finished.items():
        assert output == expected[i], (i, limits, requests[i])
    for (_, _, prompt, params), completions_ in zip(requests, expected):
        assert len(completions_) == params.n
        for completion in completions_:
            check_completion(completion, prompt, params, limits["max_model_len"])
