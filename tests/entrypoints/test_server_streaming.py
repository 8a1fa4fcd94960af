"""What a stream of `shardline serve` carries, chunk by chunk, against the engine's own
outputs for the same request (tiny-llama with a chat template; its byte-level tokenizer
makes tokens that are part of a multi-byte character, so complete no text alone)."""

import asyncio
import json
import random

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (test extra) is not installed")

from shardline.entrypoints.serving import Decode  # noqa: E402
from shardline.sampling_params import SamplingParams  # noqa: E402
from server_helpers import MODEL, TIMEOUT, engine_idle, random_text  # noqa: E402


def engine_steps(llm, prompt, params):
    """The engine's outputs for `prompt`, one per step, called directly."""
    async def run():
        return [output async for output in llm.generate(prompt, params,
                                                        f"steps-{random.random()}")]
    return asyncio.run(asyncio.wait_for(run(), TIMEOUT))


def streamed_choices(url, path, body):
    """The choices of each chunk of the streamed request, in order."""
    with httpx.stream("POST", url + path, json={**body, "stream": True},
                      timeout=TIMEOUT) as reply:
        assert reply.status_code == 200, reply.read()
        return [json.loads(line[len("data: "):])["choices"] for line in reply.iter_lines()
                if line.startswith("data: {")]


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_a_token_without_text_of_its_own_is_streamed_when_made(server, rng, chat):
    """A chunk went out only when a choice's text grew, so a token that completes no text
    (a byte of a multi-byte character, held back by the detokenizer) reached the client
    with the next one that did: a first token so was seen late, and a client counting
    chunks counted too few. Now every step that makes a token sends a chunk, its text
    possibly empty, carrying that token's logprobs; the texts still add up the same."""
    llm, url = server
    tokenizer = llm.engine.tokenizer
    max_tokens = rng.randint(3, 8)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for _ in range(40):  # a prompt whose first greedy token completes no text
        messages = [{"role": "user", "content": random_text(rng)}]
        prompt = (tokenizer.encode(tokenizer.apply_chat_template(messages, True),
                                   add_special_tokens=False) if chat else random_text(rng))
        steps = engine_steps(llm, prompt, params)
        if steps[0].outputs[0].text == "":
            break
    else:
        pytest.skip("no prompt in 40 whose first greedy token completes no text")
    texts = [step.outputs[0].text for step in steps]
    expected = [text[len(before):] for before, text in zip([""] + texts, texts)]
    final = steps[-1].outputs[0]

    body = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if chat:
        body.update(messages=messages, logprobs=True)
    else:
        body.update(prompt=prompt, logprobs=0)
    chunks = streamed_choices(url, "/v1/chat/completions" if chat else "/v1/completions",
                              body)
    if chat:
        assert chunks[0] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}]
        chunks = chunks[1:]
    assert all(len(choices) == 1 for choices in chunks)
    choices = [c[0] for c in chunks]
    streamed = [c["delta"]["content"] if chat else c["text"] for c in choices]
    assert streamed[0] == "" and streamed == expected
    assert "".join(streamed) == final.text
    decode = Decode(tokenizer)
    if chat:
        carried = [[bytes(e["bytes"]) for e in c["logprobs"]["content"]] for c in choices]
        assert carried == [[tokenizer.token_bytes(t)] for t in final.token_ids]
    else:
        carried = [c["logprobs"]["tokens"] for c in choices]
        assert carried == [[decode(t)] for t in final.token_ids]
    assert [c["finish_reason"] for c in choices] == [None] * (max_tokens - 1) + ["length"]


def test_a_client_that_stops_reading_holds_a_bounded_number_of_outputs(server, rng):
    """A request's merged stream queued every step's output of each prompt while its client
    (the response being sent) did not read, each with the text so far. Past MAX_UNREAD
    unread outputs of a prompt, its newest replaces the last queued one: each prompt still
    ends with its finished output, its tokens those the engine makes for it alone (up to a
    near tie: the batch and the prompt alone round apart)."""
    from near_ties import assert_greedy_match
    from shardline.engine.output_queue import MAX_UNREAD
    from shardline.entrypoints.serving import Generation

    llm, _ = server
    prompts = [random_text(rng) for _ in range(rng.randint(1, 3))]
    params = SamplingParams(temperature=0, max_tokens=MAX_UNREAD + rng.randint(2, 40),
                            ignore_eos=True, n=rng.randint(1, 3), logprobs=2)

    async def run():
        stream = Generation(llm, prompts, params, "cmpl", "prompt").stream()
        first = await stream.__anext__()
        await until_idle(llm)
        return [first] + [item async for item in stream]

    items = asyncio.run(asyncio.wait_for(run(), TIMEOUT))
    for index, prompt in enumerate(prompts):
        outputs = [output for i, output in items if i == index]
        assert len(outputs) <= 1 + MAX_UNREAD
        assert outputs[-1].finished and not any(output.finished for output in outputs[:-1])
        alone = engine_steps(llm, prompt, params)[-1]
        expected, got = ([(list(c.token_ids), list(c.logprobs)) for c in output.outputs]
                         for output in (alone, outputs[-1]))
        assert_greedy_match(expected, got)


async def until_idle(llm):
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while not engine_idle(llm):
        assert asyncio.get_running_loop().time() < deadline, "the engine did not finish"
        await asyncio.sleep(0.01)
