"""Comparing two runs whose arithmetic differs: a batch against each prompt alone, a layout
against one rank, shardline against transformers. fp32 rounding then moves logits by about
1e-6, which flips an argmax where the two best tokens are closer than that (on the
presets, from the measured rounding and gap sizes: about once in 3 x 10^5 greedy tokens),
and in an MoE layer flips a router's choice where two experts' scores are that close,
changing everything after it.

So greedy tokens may part only at a near tie, after which a sequence is compared no
further; and prompt logits are compared up to the first near-tied routing decision.
A bug gives partings that are no ties, or logits that differ before any near tie. Seeded
draws part the same way, where the draw's two best scores were that close (about once in
5 x 10^5 drawn tokens, from the measured density of score gaps and rounding sizes).
"""

from __future__ import annotations

import math

import torch

# A parting at a dense model's near tie: the two tokens' logprobs within this of each
# other in both runs (rounding moved them by 1.3e-5 at most, measured batch against alone).
NEAR_TIE = 1e-3
# A routing decision within this of flipping (gap between the k-th and the next expert's
# router logit): rounding moves router logits by about 1e-6.
ROUTER_TIE = 1e-4
# For MoE models a parting is allowed where both runs ranked the two tokens in their top
# MOE_TOP: after a flipped routing decision the logits differ by more than rounding.
MOE_TOP = 3

Run = list[tuple[list[int], list[dict[int, float]]]]


def outputs_run(outputs) -> Run:
    """An engine's RequestOutputs (generated with logprobs) as a Run."""
    return [(list(o.outputs[0].token_ids), list(o.outputs[0].logprobs)) for o in outputs]


def driver_run(tokens: list[list[int]], logprobs: list[list]) -> Run:
    """WorkerDriver.generate's tokens and TokenLogprobs as a Run."""
    return [(list(t), [dict(zip(lp.top_token_ids, lp.top_logprobs)) for lp in lps])
            for t, lps in zip(tokens, logprobs, strict=True)]


def assert_greedy_match(expected: Run, actual: Run, moe: bool = False) -> None:
    """Equal greedy tokens, except that one sequence at most may part at a near tie:
    dense models where both runs had the two tokens within NEAR_TIE of each other, MoE
    models where both runs ranked them in their top MOE_TOP (logprobs must hold as many).
    Two independent near ties in one comparison would be a one in 10^6 coincidence."""
    parted = []
    for i, ((exp, exp_lps), (act, act_lps)) in enumerate(zip(expected, actual, strict=True)):
        pos = _parting(i, exp, act)
        if pos is None:
            continue
        e, a = exp[pos], act[pos]
        assert _near_tie(exp_lps[pos], e, a, moe) and _near_tie(act_lps[pos], a, e, moe), \
            f"sequence {i} parts at token {pos}: {exp} against {act}, beyond a near tie " \
            f"(logprobs {exp_lps[pos]} against {act_lps[pos]})"
        parted.append(i)
    assert len(parted) <= 1, f"sequences {parted} part from the expected tokens"


def sampled_run(outputs, params) -> tuple[Run, list[int]]:
    """Every completion of each RequestOutput (generated with a seed and logprobs) as a
    Run, and the seed each was drawn with: completion i of a request seeded s draws with
    s + i."""
    run, seeds = [], []
    for output, p in zip(outputs, params, strict=True):
        for c in output.outputs:
            run.append((list(c.token_ids), list(c.logprobs)))
            seeds.append(p.seed + c.index)
    return run, seeds


def assert_sampled_match(expected: Run, actual: Run, seeds: list[int], vocab_size: int,
                         device: str = "cpu") -> None:
    """Equal seeded draws of a dense model, except that one sequence at most may part at a
    near tie of its draw. The worker draws token p of a sequence seeded s as the argmax of
    logprob - log(E) over the vocabulary, E ~ Exp(1) from a generator on its device seeded
    sampling_seed(s, p), the logprobs those it reports: rebuilt here, at a parting each
    run's token must score within NEAR_TIE of the other run's (rounding moves a score by
    about 1e-6; both runs' scores then lie between the two). Both runs must report logprobs
    (logprobs=0 will do)."""
    parted = []
    for i, ((exp, exp_lps), (act, act_lps)) in enumerate(zip(expected, actual, strict=True)):
        pos = _parting(i, exp, act)
        if pos is None:
            continue
        noise = draw_noise(seeds[i], pos, vocab_size, device)
        scores = [lps[pos][t] - math.log(noise[t]) for lps, t in ((exp_lps, exp[pos]),
                                                                  (act_lps, act[pos]))]
        assert abs(scores[0] - scores[1]) <= NEAR_TIE, \
            f"sequence {i} (seed {seeds[i]}) parts at token {pos}: {exp} against {act}, " \
            f"beyond a near tie of the draw (scores {scores})"
        parted.append(i)
    assert len(parted) <= 1, f"sequences {parted} part from the expected tokens"


def draw_noise(seed: int, index: int, vocab_size: int, device: str = "cpu") -> torch.Tensor:
    """The Exp(1) noise over the vocabulary with which the worker draws output token `index`
    of a request seeded `seed` (its generator's seed and its clamp away from 0)."""
    from shardline.worker.model_runner import sampling_seed

    gen = torch.Generator(device).manual_seed(sampling_seed(seed, index))
    noise = torch.empty(vocab_size, device=device).exponential_(generator=gen)
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny).cpu()


def worker_device(llm) -> str:
    """The device of an in-process LLM's worker: where its seeded draws' noise comes from."""
    return str(llm.engine.executor.worker.model_runner.device)


def _parting(i: int, expected: list[int], actual: list[int]) -> int | None:
    """The first position where sequence i's two runs differ; None where they are equal
    (of one length)."""
    pos = next((p for p, (e, a) in enumerate(zip(expected, actual)) if e != a), None)
    if pos is None:
        assert len(expected) == len(actual), f"sequence {i}: {expected} against {actual}"
    return pos


def _near_tie(logprobs: dict[int, float], chosen: int, other: int, moe: bool) -> bool:
    if other not in logprobs:
        return False
    if moe:
        return sorted(logprobs.values(), reverse=True).index(logprobs[other]) < MOE_TOP
    return logprobs[chosen] - logprobs[other] <= NEAR_TIE


def hf_greedy(model, prompt: list[int], max_new: int, top: int = MOE_TOP
              ) -> tuple[list[int], list[dict[int, float]]]:
    """transformers' max_new greedy tokens (EOS off, as in the worker) and the top
    logprobs at each, as one sequence of a Run."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                             max_new_tokens=max_new, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    logprobs = []
    for logits in out.logits:
        values, ids = logits[0].float().log_softmax(-1).topk(top)
        logprobs.append(dict(zip(ids.tolist(), values.tolist())))
    return out.sequences[0, len(prompt):].tolist(), logprobs


def is_moe(model) -> bool:
    """Whether a transformers model routes tokens to experts."""
    return getattr(model.config, "num_experts_per_tok", None) is not None


def hf_prompt_logits(model, prompt: list[int], router_tie: float = ROUTER_TIE) -> torch.Tensor:
    """transformers' logits at each prompt position, up to the first position where an MoE
    layer's router was within `router_tie` of choosing other experts (rounding may route
    that token elsewhere, which changes its logits and every later position's)."""
    with torch.no_grad():
        out = model(torch.tensor([prompt]), output_router_logits=is_moe(model))
    logits = out.logits[0]
    if not is_moe(model):
        return logits
    top_k = model.config.num_experts_per_tok
    for router in out.router_logits:
        scores = router.float().sort(-1, descending=True).values
        tied = (scores[:, top_k - 1] - scores[:, top_k] < router_tie).nonzero()
        if len(tied):
            logits = logits[:int(tied[0])]
    return logits


def assert_logits_close(ours: torch.Tensor, reference: torch.Tensor, what: str,
                        tolerance: float = 1e-4) -> None:
    """`ours` within `tolerance` of `reference` relative to its largest magnitude, over the
    positions `reference` has (hf_prompt_logits may stop early)."""
    assert ours.shape[0] >= reference.shape[0], what
    if reference.numel() == 0:
        return
    rel = (ours[:reference.shape[0]] - reference).abs().max() / reference.abs().max()
    assert rel < tolerance, f"{what}: relative error {rel:.2e} against transformers"
