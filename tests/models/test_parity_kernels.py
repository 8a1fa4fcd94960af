"""Parity with Hugging Face transformers with the Triton kernels switched on.

SHARDLINE_FORCE_TRITON=1 sends every op of the engine through the Triton kernels, which
on CPU run in the interpreter (conftest sets TRITON_INTERPRET=1). One dense and one MoE
preset are checked, at small shapes because the interpreter is slow. Spies on the kernel
entry points prove the Triton path ran and the torch references did not.
"""

from collections import Counter

import pytest
import torch

import shardline.kernels
from near_ties import (MOE_TOP, assert_greedy_match, assert_logits_close, driver_run,
                       hf_greedy, hf_prompt_logits, is_moe)
from shardline.sampling_params import SamplingParams
from shardline.kernels import (attention_decode, attention_prefill, kv_cache, matmul,
                               matmul_split_k, moe, norm)
from shardline.kernels import dispatch, reference, rotary, rotary_kv_cache
from worker_driver import WorkerDriver, make_worker


DENSE, MOE = "tiny-qwen2", "tiny-mixtral"
# A hang guard, not a speed check: with both cores of a 2-core machine busy, one test took
# 91 s (the interpreter, plus the transformers model the first test of a preset loads).
INTERPRETED_TIMEOUT_S = 600
TRITON_ENTRY_POINTS = [
    (matmul, "_tiled"), (matmul_split_k, "split_k_gemm"), (matmul, "linear_rms_norm"),
    (attention_decode, "paged_decode_attention"), (attention_prefill, "paged_prefill_attention"),
    (kv_cache, "write_kv_cache"), (moe, "fused_moe"), (norm, "rms_norm"),
    (rotary, "rotary_embedding"), (rotary_kv_cache, "rotary_and_write_kv_cache"),
    (rotary_kv_cache, "qkv_rotary_and_write_kv_cache"),
]
FALLBACKS = [(reference, op) for op in shardline.kernels.__all__]
PREFILL_KERNELS = {"_tiled", "paged_prefill_attention", "qkv_rotary_and_write_kv_cache",
                   "rms_norm", "linear_rms_norm"}
DECODE_KERNELS = {"split_k_gemm", "linear_rms_norm", "qkv_rotary_and_write_kv_cache",
                  "paged_decode_attention", "paged_prefill_attention"}


@pytest.fixture
def kernel_calls(monkeypatch) -> Counter:
    """Forces the Triton kernels on CPU tensors and counts calls of each Triton entry point
    and of each op's torch reference (the CPU fallback)."""
    monkeypatch.setenv("SHARDLINE_FORCE_TRITON", "1")
    monkeypatch.delenv("SHARDLINE_DISABLE_TRITON", raising=False)
    dispatch.reset_triton_choice()
    calls: Counter = Counter()

    def spy(module, name: str, key: str) -> None:
        original = getattr(module, name)

        def counted(*args, **kwargs):
            calls[key] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)

    for module, name in TRITON_ENTRY_POINTS:
        spy(module, name, name)
    for module, name in FALLBACKS:
        spy(module, name, f"fallback:{module.__name__}.{name}")
    return calls


def _assert_triton_ran(calls: Counter, expected: set[str]) -> None:
    fallbacks = {k: n for k, n in calls.items() if k.startswith("fallback:")}
    assert not fallbacks, f"torch fallbacks ran with Triton forced: {fallbacks}"
    missing = {k for k in expected if calls[k] == 0}
    assert not missing, f"Triton entry points never called: {sorted(missing)}; calls {calls}"


# Three tokens each under a 12-token budget: the first two steps chunk the longest prompt
# with decodes mixed in, and the last ones decode only (at least one step of the longest
# prompt alone), whatever lengths are drawn; a fourth token only added decode steps.
GREEDY_TOKENS = 3


def _generate_in_steps(driver: WorkerDriver, prompts: list[list[int]]) -> tuple:
    """driver.generate's greedy tokens and logprobs under a 12-token budget, checking that
    the steps mixed decodes into prefill chunks and ended in decode-only steps."""
    steps = []
    execute = driver.worker.execute_model

    def recorded(scheduler_output):
        if scheduler_output.num_scheduled_tokens:
            steps.append(sorted(scheduler_output.num_scheduled_tokens.values()))
        return execute(scheduler_output)
    driver.worker.execute_model = recorded
    ours = driver.generate(prompts, SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS,
                                                   logprobs=MOE_TOP), token_budget=12)
    assert any(counts[0] == 1 and counts[-1] > 1 for counts in steps), steps
    assert steps[-1] == [1], steps
    return ours


def _random_prompts(lengths: list[tuple[int, int]]) -> list[list[int]]:
    """One prompt of byte tokens per (low, high) range, its length drawn in [low, high)."""
    return [torch.randint(3, 259, (int(torch.randint(low, high, (1,))),)).tolist()
            for low, high in lengths]


@pytest.mark.timeout(INTERPRETED_TIMEOUT_S)
@pytest.mark.parametrize("name", [DENSE, MOE])
def test_prompt_logits_match_transformers(name, hf_model, kernel_calls, fresh_seed):
    """All prompts in one step (more than 16 tokens: the tiled GEMM, not split-K)."""
    hf = hf_model(name)
    driver = WorkerDriver(make_worker(name, block_size=4, num_blocks=32))
    prompts = _random_prompts([(4, 8), (8, 14), (14, 20)])
    ours = driver.prompt_logits(prompts)
    _assert_triton_ran(kernel_calls, PREFILL_KERNELS | ({"fused_moe"} if name == MOE else set()))
    for prompt, logits in zip(prompts, ours):
        assert_logits_close(logits, hf_prompt_logits(hf, prompt),
                            f"{name}, prompt of {len(prompt)} tokens")


@pytest.mark.timeout(INTERPRETED_TIMEOUT_S)
@pytest.mark.parametrize("name", [DENSE, MOE])
def test_greedy_tokens_match_transformers(name, hf_model, kernel_calls, fresh_seed):
    """A 12-token budget chunks the longest prompt over cached blocks, mixes decodes into
    prefill steps, and ends in decode-only steps (the decode kernel, split-K GEMMs)."""
    hf = hf_model(name)
    driver = WorkerDriver(make_worker(name, block_size=4, num_blocks=32))
    prompts = _random_prompts([(2, 6), (6, 11), (14, 20)])
    ours = _generate_in_steps(driver, prompts)
    _assert_triton_ran(kernel_calls, DECODE_KERNELS | ({"fused_moe"} if name == MOE else set()))
    assert_greedy_match([hf_greedy(hf, prompt, GREEDY_TOKENS) for prompt in prompts],
                        driver_run(*ours), moe=is_moe(hf))


@pytest.mark.timeout(INTERPRETED_TIMEOUT_S)
def test_greedy_tokens_match_with_the_linears_on_torch_matmul(hf_model, kernel_calls,
                                                              monkeypatch, fresh_seed):
    """What a GPU without a tuned table runs: every linear in its torch.matmul (cuBLAS)
    form, and so the residual add + RMSNorm and the rotary + KV-cache write as kernels of
    their own, the rest in Triton."""
    monkeypatch.setattr(dispatch, "_triton_linear", lambda *args: False)
    hf = hf_model(DENSE)
    driver = WorkerDriver(make_worker(DENSE, block_size=4, num_blocks=32))
    prompts = _random_prompts([(2, 6), (6, 11), (14, 20)])
    ours = _generate_in_steps(driver, prompts)
    fallbacks = {k for k in kernel_calls if k.startswith("fallback:")}
    assert fallbacks == {"fallback:shardline.kernels.reference.linear",
                         "fallback:shardline.kernels.reference.linear_silu_mul"}, kernel_calls
    triton = {"rms_norm", "rotary_and_write_kv_cache", "paged_decode_attention",
              "paged_prefill_attention"}
    assert all(kernel_calls[k] for k in triton) and not any(
        kernel_calls[k] for k in ("_tiled", "split_k_gemm", "linear_rms_norm",
                                  "qkv_rotary_and_write_kv_cache")), kernel_calls
    assert_greedy_match([hf_greedy(hf, prompt, GREEDY_TOKENS) for prompt in prompts],
                        driver_run(*ours), moe=False)
