"""What the model runner hands its sampler: the LM head's logits to write into, and a
request's min_tokens stop ids only while it is short of min_tokens."""

import gc
import weakref

import torch

from shardline import SamplingParams
from shardline.step import NewRequestData, SchedulerOutput
from worker_driver import make_worker


def test_the_sampler_masks_the_lm_heads_logits_where_they_lie(rng):
    """The LM head's logits are this step's alone: the sampler writes its masks into them
    (it wrote them into a copy, at 256 rows x 151k most of its time on the CPU). Seen here
    as the stop ids of a request short of min_tokens at -inf in the very tensor the LM head
    returned, and its greedy token the argmax of the rest."""
    runner = make_worker("tiny-llama").model_runner
    vocab = runner.info.vocab_size
    stops = rng.sample(range(vocab), rng.choice([3, vocab // 4]))
    params = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=2, ignore_eos=True,
                            stop_token_ids=stops)
    returned = []
    lm_head = runner.model.compute_logits
    runner.model.compute_logits = lambda hidden: returned.append(lm_head(hidden)) or returned[-1]
    out = runner.execute_model(SchedulerOutput(
        [NewRequestData("r", [1, 2, 3], [], params.to_dict(), [0], 0)],
        num_scheduled_tokens={"r": 3}))
    logits = returned[-1]
    assert logits.shape == (1, vocab)
    assert torch.isneginf(logits[0, stops]).all()
    assert out.sampled_token_ids == [int(logits[0].argmax())]
    assert out.sampled_token_ids[0] not in stops


def test_the_stop_mask_goes_at_min_tokens_and_the_bias_rows_stay(rng):
    """A request's min_tokens stop ids, masked by a vocabulary mask on the device when they
    are many, are released as soon as it reaches min_tokens: no later step masks them, and
    they stayed (ids and mask) until the request ended. Steps short of min_tokens mask the
    stop ids (never drawn) with one mask, made once; the first step at min_tokens hands the
    sampler no stop ids and the request keeps none, its mask freed; its logit_bias and
    allowed ids' vocabulary rows, used every step, stay. Half the time the request's last
    token is one sampled ahead of the engine's view."""
    runner = make_worker("tiny-llama").model_runner
    vocab, device = runner.info.vocab_size, runner.device
    many = -(-vocab // 8)
    min_tokens = rng.randint(1, 4)
    stops = rng.sample(range(vocab), many)
    params = SamplingParams(temperature=0.0, max_tokens=16, min_tokens=min_tokens,
                            ignore_eos=True, stop_token_ids=stops,
                            logit_bias={t: rng.uniform(-1, 1)
                                        for t in rng.sample(range(vocab), many)},
                            allowed_token_ids=rng.sample(range(vocab), many))
    runner.update_states(SchedulerOutput([NewRequestData("r", [1, 2], [], params.to_dict(),
                                                         [0], 2)]))
    state = runner.requests["r"]
    assert state.stop_ids.uses_row(vocab)
    mask, bias_rows, pending = None, None, None
    for _ in range(min_tokens + 2):
        # The engine has sent the token of the step before, or not yet (the step goes ahead).
        ahead = pending is not None and rng.random() < 0.5
        if pending is not None and not ahead:
            state.output_token_ids.append(pending)
        index = len(state.output_token_ids) + ahead
        batch = runner._sampling_batch(["r"], ["r"] if ahead else [])
        token = runner.sampler(torch.randn(1, vocab) * 3, batch, overwrite=True).to_host()[0][0]
        del batch
        gc.collect()
        if index < min_tokens:
            assert token not in stops
            made = state.stop_ids.row(vocab, device)
            assert mask is None or mask() is made   # made once, kept while it is used
            mask = weakref.ref(made)
            del made
        else:
            assert len(state.stop_ids) == 0
            assert mask is None or mask() is None
        rows = [state.token_bias.biased.row(vocab, device),
                state.token_bias.permitted.row(vocab, device)]
        assert bias_rows is None or all(a is b for a, b in zip(rows, bias_rows))
        bias_rows = rows
        if ahead:
            state.output_token_ids.append(pending)
        pending = token
    assert mask is not None
