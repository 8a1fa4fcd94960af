"""The near-tie rule of tests/near_ties.py: greedy runs may part only where both had the
two tokens nearly tied (in the top 3, for MoE models), seeded runs only where the draw's
two best scores were, and only in one sequence."""

import math

import pytest

from near_ties import (NEAR_TIE, assert_greedy_match, assert_sampled_match, draw_noise,
                       sampled_run)


def sequence(rng, length: int) -> tuple[list[int], list[dict[int, float]]]:
    """Random greedy tokens, each with the top-3 logprobs at its position (itself first)."""
    tokens, logprobs = [], []
    for _ in range(length):
        top = rng.sample(range(3, 259), 3)
        best = -rng.uniform(0.1, 2.0)
        tokens.append(top[0])
        logprobs.append({top[0]: best, top[1]: best - 0.5, top[2]: best - 1.0})
    return tokens, logprobs


def parting(rng, pos: int, gap: float, rank: int = 1, length: int = 8):
    """Two runs of one sequence, equal before `pos`. There the expected run picks its best
    token and the actual run the expected run's rank-`rank` token (rank 3: one outside
    its top 3), each run having the other's choice `gap` below its own."""
    tokens, logprobs = sequence(rng, length)
    here = dict(logprobs[pos])
    chosen = tokens[pos]
    ranked = sorted(here, key=here.get, reverse=True)
    other = ranked[rank] if rank < 3 else next(t for t in range(3, 259) if t not in here)
    if rank < 3:
        here[other] = here[chosen] - gap
    theirs = {other: here[chosen], chosen: here[chosen] - gap}
    rest_tokens, rest_logprobs = sequence(rng, length - pos - 1)
    expected = (tokens, logprobs[:pos] + [here] + logprobs[pos + 1:])
    actual = (tokens[:pos] + [other] + rest_tokens, logprobs[:pos] + [theirs] + rest_logprobs)
    return expected, actual


def test_equal_runs_and_one_near_tie_pass(rng):
    runs = [sequence(rng, 8) for _ in range(4)]
    assert_greedy_match(runs, runs)
    expected, actual = parting(rng, rng.randrange(8), NEAR_TIE / 2)
    assert_greedy_match(runs[:2] + [expected] + runs[2:], runs[:2] + [actual] + runs[2:])


@pytest.mark.parametrize("moe", [False, True])
def test_a_parting_beyond_a_near_tie_fails(rng, moe):
    pos = rng.randrange(8)
    expected, actual = parting(rng, pos, 0.3, rank=3 if moe else 1)
    with pytest.raises(AssertionError, match=f"sequence 0 parts at token {pos}"):
        assert_greedy_match([expected], [actual], moe=moe)


def test_moe_runs_may_part_within_their_top_three(rng):
    expected, actual = parting(rng, rng.randrange(8), 0.3, rank=2)
    assert_greedy_match([expected], [actual], moe=True)
    with pytest.raises(AssertionError, match="parts at token"):
        assert_greedy_match([expected], [actual])


def test_two_partings_or_a_shorter_run_fail(rng):
    pairs = [parting(rng, rng.randrange(8), NEAR_TIE / 2) for _ in range(2)]
    with pytest.raises(AssertionError, match=r"sequences \[0, 1\] part"):
        assert_greedy_match([p[0] for p in pairs], [p[1] for p in pairs])
    tokens, logprobs = sequence(rng, 8)
    with pytest.raises(AssertionError, match="sequence 0"):
        assert_greedy_match([(tokens, logprobs)], [(tokens[:-1], logprobs[:-1])])


VOCAB = 320


def sampled_parting(rng, seed: int, gap: float, length: int = 8):
    """Two seeded runs of one sequence, equal but at a random position, where the expected
    run draws its token and the actual run another one that scores `gap` below it under
    the draw's noise; and that position."""
    tokens, logprobs = sequence(rng, length)
    pos = rng.randrange(length)
    noise = draw_noise(seed, pos, VOCAB)
    chosen = tokens[pos]
    other = next(t for t in range(3, 259) if t not in logprobs[pos])
    score = logprobs[pos][chosen] - math.log(noise[chosen])
    theirs = {other: score - gap + math.log(noise[other])}
    rest_tokens, rest_logprobs = sequence(rng, length - pos - 1)
    actual = (tokens[:pos] + [other] + rest_tokens,
              logprobs[:pos] + [theirs] + rest_logprobs)
    return (tokens, logprobs), actual, pos


def test_seeded_runs_part_only_at_a_near_tie_of_the_draw_and_once(rng):
    seeds = [rng.randrange(2**40) for _ in range(3)]
    runs = [sequence(rng, 8) for _ in range(3)]
    assert_sampled_match(runs, runs, seeds, VOCAB)
    expected, actual, _ = sampled_parting(rng, seeds[1], NEAR_TIE / 2)
    assert_sampled_match([runs[0], expected, runs[2]], [runs[0], actual, runs[2]], seeds,
                         VOCAB)
    expected, actual, pos = sampled_parting(rng, seeds[1], 0.3)
    with pytest.raises(AssertionError, match=f"sequence 1 .* parts at token {pos}"):
        assert_sampled_match([runs[0], expected], [runs[0], actual], seeds[:2], VOCAB)
    pairs = [sampled_parting(rng, seed, NEAR_TIE / 2) for seed in seeds[:2]]
    with pytest.raises(AssertionError, match=r"sequences \[0, 1\] part"):
        assert_sampled_match([p[0] for p in pairs], [p[1] for p in pairs], seeds[:2], VOCAB)


def test_the_rebuilt_noise_is_the_workers(rng):
    """Each token tiny-llama draws scores highest, under the noise draw_noise rebuilds,
    of the tokens whose logprobs it reports (completion i of n drawn with seed + i): what
    assert_sampled_match scores partings with is what the worker drew with."""
    from shardline import LLM, SamplingParams

    llm = LLM("tiny-llama", device="cpu", block_size=4, num_kv_blocks=64)
    prompts = [[rng.randrange(3, 259) for _ in range(rng.randint(1, 20))] for _ in range(3)]
    params = [SamplingParams(n=2, temperature=rng.choice([0.7, 1.0, 1.5]), max_tokens=8,
                             top_p=rng.choice([1.0, 0.9]), seed=rng.randrange(2**40),
                             logprobs=20, ignore_eos=True) for _ in prompts]
    run, seeds = sampled_run(llm.generate(prompts, params), params)
    assert len(run) == 6
    for (tokens, logprobs), seed in zip(run, seeds):
        for pos, (token, reported) in enumerate(zip(tokens, logprobs)):
            noise = draw_noise(seed, pos, llm.engine.vocab_size)
            scores = {t: lp - math.log(noise[t]) for t, lp in reported.items()}
            # The best, up to the rounding of the worker's fp32 probs / noise.
            assert scores[token] >= max(scores.values()) - 1e-5, (seed, pos, token, scores)
    llm.shutdown()
