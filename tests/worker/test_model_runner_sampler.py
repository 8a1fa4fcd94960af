"""What the model runner hands its sampler: the LM head's logits to write into."""

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

