"""The model runner on a GPU: queueing a decode step never waits for the device, which is
what lets async scheduling prepare step N+1 while the GPU runs step N."""

import math
import threading
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from shardline import LLM, SamplingParams
from shardline.step import NewRequestData, SchedulerOutput
from shardline.worker.model_runner import ModelRunner
from worker_driver import make_worker


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("sampling", ["greedy", "seeded", "penalized"])
def test_queueing_a_decode_step_never_waits_for_the_gpu(sampling, rng):
    """Penalized: one request of three has repetition, presence and frequency penalties
    (it never goes ahead, but the steps that hold it are queued behind one in flight).
    Each case runs twice, the second time with min_tokens holding off stop tokens (their
    mask is built on the device in every decode step) and with prompt logprobs."""
    llm = LLM("tiny-llama", device="cuda", async_scheduling=True, max_num_seqs=4)
    try:
        runner = llm.engine.executor.worker.model_runner
        queue = runner.queue_step
        checked = []

        def strict(scheduler_output):
            if set(scheduler_output.num_scheduled_tokens.values()) != {1}:
                return queue(scheduler_output)  # prefill: not what this test is about
            torch.cuda.set_sync_debug_mode("error")
            try:
                return queue(scheduler_output)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                checked.append(len(scheduler_output.num_scheduled_tokens))

        runner.queue_step = strict
        prompts = [[rng.randrange(3, 259) for _ in range(rng.randint(2, 20))] for _ in range(3)]
        plain = SamplingParams(temperature=0.0 if sampling == "greedy" else 0.8,
                               seed=rng.randrange(1000), max_tokens=8, ignore_eos=True)
        penalized = SamplingParams(temperature=0.8, seed=rng.randrange(1000), max_tokens=8,
                                   ignore_eos=True, repetition_penalty=1.3,
                                   presence_penalty=0.5, frequency_penalty=0.4)
        params = [penalized if sampling == "penalized" and i == 0 else plain
                  for i in range(len(prompts))]
        outputs = llm.generate(prompts, params)
        assert all(len(o.outputs[0].token_ids) == 8 for o in outputs)
        assert checked and max(checked) == 3
        # Again, with each request's free tokens as stop tokens, masked on the device in
        # every step (min_tokens), and prompt logprobs, copied to the host behind them.
        checked.clear()
        stops = [sorted(set(o.outputs[0].token_ids)) for o in outputs]
        held = [replace(p, min_tokens=8, stop_token_ids=ids, prompt_logprobs=2)
                for p, ids in zip(params, stops)]
        for prompt, ids, output in zip(prompts, stops, llm.generate(prompts, held)):
            tokens = output.outputs[0].token_ids
            assert len(tokens) == 8 and not set(tokens) & set(ids), (ids, tokens)
            assert output.prompt_logprobs[0] is None
            assert len(output.prompt_logprobs) == len(prompt)
            for token, entry in zip(prompt[1:], output.prompt_logprobs[1:]):
                assert token in entry and len(entry) in (2, 3), entry
                assert all(-math.inf < lp <= 0 for lp in entry.values()), entry
                if len(entry) == 3:   # the prompt token is not among the 2 best
                    assert min(entry.values()) == entry[token], entry
        assert checked and max(checked) == 3
    finally:
        llm.shutdown()


def test_seeds_apart_by_2_to_the_63_draw_differently(rng):
    """The mixing works mod 2**64, the width of torch's generator seeds (a seed and one
    2**63 above it drew the same tokens when it worked mod 2**63)."""
    from shardline.worker.model_runner import sampling_seed
    for _ in range(100):
        seed, index = rng.randrange(-2**63, 2**63), rng.randrange(1000)
        mixed = sampling_seed(seed, index)
        assert 0 <= mixed < 2**64
        assert mixed != sampling_seed(seed + 2**63, index)
        assert mixed == sampling_seed(seed + 2**64, index)


def test_the_rotary_table_covers_max_model_len_and_no_more(rng):
    """The table once covered max_position_embeddings whatever max_model_len was: a config
    declaring 1e8 positions made every worker allocate gigabytes it could never use."""
    max_model_len = rng.randint(16, 200)
    greedy = SamplingParams(temperature=0.0, max_tokens=max_model_len // 2, ignore_eos=True)
    prompt = [rng.randrange(3, 259) for _ in range(max_model_len - greedy.max_tokens)]
    expected = LLM("tiny-llama", device="cpu").generate([prompt], greedy)[0]
    llm = LLM("tiny-llama", device="cpu", max_model_len=max_model_len)
    model = llm.engine.executor.worker.model_runner.model
    tables = {m.cos_sin_cache.shape[0] for m in model.modules() if hasattr(m, "cos_sin_cache")}
    assert tables == {max_model_len}
    assert llm.generate([prompt], greedy)[0].outputs[0].token_ids == \
        expected.outputs[0].token_ids


def test_a_step_makes_the_workers_gpu_current_whatever_thread_runs_it(rng, monkeypatch):
    """torch.cuda.set_device holds for the calling thread only, and AsyncLLM steps its
    in-process worker on a thread of its own, where GPU 0 is current: a worker on another
    GPU launched its kernels and recorded its host-copy events there. Each entry point now
    makes the worker's GPU current (torch.cuda.device faked: no GPU needed)."""
    current = threading.local()

    class FakeCudaDevice:
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            self.outer = getattr(current, "device", None)
            current.device = self.device

        def __exit__(self, *exc):
            current.device = self.outer

    seen = []

    def forward(self, scheduler_output):
        seen.append(getattr(current, "device", None))
        return None, None   # as on a pipeline stage that returns no hidden states
    monkeypatch.setattr(torch.cuda, "device", FakeCudaDevice)
    monkeypatch.setattr(ModelRunner, "_forward", forward)
    runner = object.__new__(ModelRunner)
    runner.device = torch.device("cuda", rng.randrange(1, 8))
    step = SimpleNamespace(is_empty=False)

    def run_steps():
        runner.execute_model(step)
        runner.queue_step(step)()
        runner.score(step)
    thread = threading.Thread(target=run_steps)
    thread.start()
    thread.join()
    assert seen == [runner.device] * 3


def test_a_requests_stop_tokens_are_gathered_once_however_many(rng):
    """While a request is short of min_tokens its stop tokens are masked every step, and
    they may number a whole vocabulary: they were gathered into Python lists each step
    (0.46 s a step for 8 rows of 151k ids). The runner now makes one BlockedTokens per
    request, its stop ids and eos (unless ignored) without repeats, and hands it back."""
    runner = make_worker("tiny-llama").model_runner
    eos = runner._eos_token_ids
    stops = [rng.randrange(300) for _ in range(rng.randint(1, 40))]
    for ignore_eos in (False, True):
        params = SamplingParams(stop_token_ids=stops + stops[:3], min_tokens=5,
                                ignore_eos=ignore_eos)
        req_id = f"r{ignore_eos}"
        runner.update_states(SchedulerOutput(
            [NewRequestData(req_id, [1, 2, 3], [], params.to_dict(), [0], 3)]))
        first = runner._sampling_batch([req_id], []).blocked_token_ids[0]
        expected = set(stops) | (set() if ignore_eos else set(eos))
        assert sorted(first.ids.tolist()) == sorted(expected)
        assert runner._sampling_batch([req_id], []).blocked_token_ids[0] is first


def _random_params(rng, vocab: int) -> SamplingParams:
    ids = rng.sample(range(vocab), rng.randint(1, vocab))
    return SamplingParams(
        temperature=rng.choice([0.0, 1.0]), max_tokens=8,
        min_tokens=rng.choice([0, 0, 3]), ignore_eos=rng.random() < 0.5,
        stop_token_ids=rng.sample(range(vocab), rng.randint(0, 5)),
        logit_bias=({t: rng.uniform(-100, 100) for t in ids} if rng.random() < 0.6 else None),
        allowed_token_ids=rng.sample(range(vocab), rng.randint(1, 9))
        if rng.random() < 0.3 else None)


def test_a_requests_sampling_arrays_are_made_once_when_it_is_added(rng):
    """Each request's bias, allowed ids and min_tokens stop ids are made when the worker is
    given it, kept on its state and handed to the sampler as they are in every step, in
    whatever batches (two alternate under pipeline parallelism); a request re-added after
    preemption gets arrays from its new data, an aborted one leaves none behind. They
    were kept by the Sampler in a cache keyed by id(params), left with only the last
    batch's: alternating batches made every request's arrays again each step."""
    runner = make_worker("tiny-llama").model_runner
    vocab, eos = runner.info.vocab_size, set(runner._eos_token_ids)
    params = {f"r{i}": _random_params(rng, vocab) for i in range(rng.randint(4, 10))}
    runner.update_states(SchedulerOutput([NewRequestData(r, [1, 2], [], p.to_dict(), [0], 2)
                                          for r, p in params.items()]))
    states = dict(runner.requests)

    def check(req_id, state):
        p = state.sampling_params
        assert p == params[req_id]
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else eos)
        assert sorted(state.stop_ids.ids.tolist()) == (sorted(stops) if p.min_tokens else [])
        bias = state.token_bias
        if not (p.logit_bias or p.allowed_token_ids):
            assert bias is None
            return
        got = dict(zip(bias.ids.tolist(), bias.values.tolist()))
        assert got == pytest.approx(p.logit_bias or {}, abs=1e-5)
        assert sorted(bias.allowed.tolist()) == sorted(p.allowed_token_ids or [])

    for req_id, state in states.items():
        check(req_id, state)
    ids = list(states)
    batches = [ids[::2], ids[1::2]]
    for step in range(4):
        for batch_ids in batches:
            batch = runner._sampling_batch(batch_ids, [])
            for row, req_id in enumerate(batch_ids):
                state = states[req_id]
                assert batch.token_bias[row] is state.token_bias
                blocked = batch.blocked_token_ids[row]
                if len(state.output_token_ids) < state.sampling_params.min_tokens:
                    assert blocked is state.stop_ids
                else:
                    assert len(blocked) == 0
            for req_id in batch_ids:
                states[req_id].output_token_ids.append(rng.randrange(vocab))
    resumed, aborted = rng.sample(ids, 2)
    params[resumed] = _random_params(rng, vocab)
    runner.update_states(SchedulerOutput(
        [NewRequestData(resumed, [1, 2], [5, 6], params[resumed].to_dict(), [1], 0)],
        finished_req_ids=[resumed, aborted]))
    assert aborted not in runner.requests
    assert runner.requests[resumed] is not states[resumed]
    check(resumed, runner.requests[resumed])
    batch = runner._sampling_batch([resumed], [])
    assert batch.token_bias[0] is runner.requests[resumed].token_bias
    with pytest.raises(KeyError, match=aborted):
        runner._sampling_batch([aborted], [])