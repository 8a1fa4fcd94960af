"""logit_bias and allowed_token_ids end to end on tiny-llama (fp32, CPU): a forcing bias is
taken at every step, a banning one moves greedy decoding to the next most likely token,
every token is one of the allowed ids, unbiased batch mates keep their tokens, TP2 and PP2
give what one rank gives, and ids outside the vocabulary are refused before anything runs."""

import random

import pytest

from fake_engine_checks import assert_all_free
from near_ties import NEAR_TIE, assert_greedy_match, outputs_run
from shardline import LLM, SamplingParams

MODEL = "tiny-llama"
ENGINE = dict(block_size=4, num_kv_blocks=256, max_model_len=96, enable_prefix_caching=False)


@pytest.fixture(scope="module")
def llm():
    return LLM(MODEL, **ENGINE)


def random_prompts(rng: random.Random, count: int) -> list[list[int]]:
    return [[rng.randrange(3, 259) for _ in range(rng.randint(1, 20))] for _ in range(count)]


def tokens_of(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_a_bias_of_100_forces_its_token_at_every_step(llm, rng):
    vocab = llm.engine.vocab_size
    prompts = random_prompts(rng, 4)
    forced = [rng.randrange(vocab) for _ in prompts]
    params = [SamplingParams(temperature=rng.choice([0.0, 1.0]), seed=rng.randrange(2**31),
                             max_tokens=8, ignore_eos=True, logit_bias={t: 100.0})
              for t in forced]
    for token, out in zip(forced, tokens_of(llm.generate(prompts, params))):
        assert out == [token] * 8
    assert_all_free(llm.engine)


def test_a_bias_of_minus_100_on_the_greedy_token_takes_the_next_most_likely(llm, rng):
    prompts = random_prompts(rng, 5)
    free = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1, logprobs=3,
                                                ignore_eos=True))
    for prompt, output in zip(prompts, free):
        ranked = sorted(output.outputs[0].logprobs[0].items(), key=lambda kv: -kv[1])
        banned = llm.generate(prompt, SamplingParams(
            temperature=0.0, max_tokens=1, ignore_eos=True,
            logit_bias={ranked[0][0]: -100.0}))[0].outputs[0].token_ids[0]
        if ranked[1][1] - ranked[2][1] <= NEAR_TIE:   # the second and third nearly tie
            assert banned in (ranked[1][0], ranked[2][0])
        else:
            assert banned == ranked[1][0], (ranked, banned)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_every_token_is_an_allowed_one(async_scheduling, rng):
    """Greedy and seeded sampling, in chunks, with steps going ahead of the engine or not;
    the allowed ids exclude what the model would pick on its own at the first step."""
    engine = LLM(MODEL, block_size=4, num_kv_blocks=64, max_model_len=96,
                 max_num_batched_tokens=8, max_num_seqs=8, async_scheduling=async_scheduling)
    vocab = engine.engine.vocab_size
    prompts = random_prompts(rng, 6)
    free = tokens_of(engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1,
                                                             ignore_eos=True)))
    allowed = [[t for t in rng.sample(range(vocab), rng.randint(1, 8)) if t != first[0]]
               or [(first[0] + 1) % vocab] for first in free]
    params = [SamplingParams(temperature=rng.choice([0.0, 0.8, 1.5]), seed=rng.randrange(2**31),
                             max_tokens=rng.randint(1, 10), ignore_eos=True,
                             allowed_token_ids=ids) for ids in allowed]
    for ids, out in zip(allowed, tokens_of(engine.generate(prompts, params))):
        assert out and set(out) <= set(ids), (ids, out)
    assert_all_free(engine.engine)


def test_unbiased_requests_keep_their_tokens_beside_biased_ones(llm, rng):
    vocab = llm.engine.vocab_size
    prompts = random_prompts(rng, 8)
    plain = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=2)
    alone = [llm.generate(p, plain)[0] for p in prompts[::2]]
    params = [plain if i % 2 == 0 else SamplingParams(
        temperature=0.0, max_tokens=10, ignore_eos=True,
        logit_bias={rng.randrange(vocab): rng.uniform(-100, 100) for _ in range(20)},
        allowed_token_ids=rng.sample(range(vocab), 5) if i % 4 == 3 else None)
        for i in range(len(prompts))]
    together = llm.generate(prompts, params)
    assert_greedy_match(outputs_run(alone), outputs_run(together[::2]))


def test_ids_outside_the_vocabulary_are_refused_and_the_engine_goes_on(llm, rng):
    vocab = llm.engine.vocab_size
    outside = rng.randrange(vocab, 2 * vocab)
    bad = rng.choice([{outside: 1.0}, {**{t: 1.0 for t in range(5)}, outside: -5.0}])
    with pytest.raises(ValueError, match=rf"logit_bias\[{outside}\]=.* is invalid: token id "
                       rf"{outside} is outside the vocabulary \[0, {vocab}\)"):
        llm.generate([5, 6], SamplingParams(logit_bias=bad))
    with pytest.raises(ValueError, match=rf"allowed_token_ids\[1\]={outside} is outside the "
                       rf"vocabulary \[0, {vocab}\)"):
        llm.generate([5, 6], SamplingParams(allowed_token_ids=[3, outside]))
    eos = sorted(llm.engine.outputs.eos_token_ids)
    with pytest.raises(ValueError, match=r"min_tokens=2 is invalid: .* allowed_token_ids="):
        llm.generate([5, 6], SamplingParams(min_tokens=2, allowed_token_ids=eos))
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate([5, 6], SamplingParams(max_tokens=2, ignore_eos=True,
                                               allowed_token_ids=[vocab - 1]))[0] \
        .outputs[0].token_ids == [vocab - 1] * 2


@pytest.mark.usefixtures("no_process_left_behind")
@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=2, async_scheduling=True),
                                    dict(pipeline_parallel_size=2)], ids=["tp2", "pp2"])
def test_parallel_layouts_give_what_one_rank_gives(llm, layout, rng):
    """Only the first TP rank of the last stage samples; the others must not diverge with
    it (TP2 with async scheduling: the rank that samples broadcasts the tokens that went
    ahead; PP2 keeps two steps in flight)."""
    vocab = llm.engine.vocab_size
    prompts = random_prompts(rng, 4)
    params = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2,
                             logit_bias={rng.randrange(vocab): rng.uniform(-100, 100)
                                         for _ in range(30)}),
              SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2,
                             allowed_token_ids=rng.sample(range(vocab), 6)),
              SamplingParams(temperature=1.0, seed=rng.randrange(2**31), max_tokens=8,
                             ignore_eos=True, logprobs=2,
                             logit_bias={rng.randrange(vocab): 100.0}),
              SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)]
    expected = llm.generate(prompts, params)
    parallel = LLM(MODEL, **ENGINE, **layout, device="cpu")
    try:
        outputs = parallel.generate(prompts, params)
    finally:
        parallel.shutdown()
    assert_greedy_match(outputs_run(expected), outputs_run(outputs))
