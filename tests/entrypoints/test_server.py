"""`shardline serve` end to end: the official openai client against the server, started
here in a thread on a free local port over tiny-llama (with a chat template added).

Expected tokens come from the same AsyncLLM called directly, so the server must hand the
engine exactly the prompt and sampling settings the request asked for. Every wait is
bounded; the server and the engine are always shut down.
"""

import asyncio
import json
import random
import threading

import pytest

fastapi = pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
openai = pytest.importorskip("openai", reason="the openai client (test extra) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (test extra) is not installed")

from shardline.engine.async_llm import AsyncLLM  # noqa: E402
from shardline.entrypoints.app import build_app  # noqa: E402
from shardline.sampling_params import SamplingParams  # noqa: E402
from server_helpers import MODEL, TIMEOUT, direct, random_text, running_app  # noqa: E402


def test_completion_greedy_equals_engine_and_streams_the_same_text(server, client, rng):
    llm, _ = server
    prompt = random_text(rng)
    expected = direct(llm, prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    choice = reply.choices[0]
    assert choice.text == expected.outputs[0].text
    assert choice.finish_reason == "length"
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert reply.usage.completion_tokens == 8

    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=8,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8


def test_streamed_text_keeps_pace_with_the_engine(server, rng):
    """The engine holds back only an end that could begin a stop string; the stream shows
    each text the engine shows, when it shows it (it held back len(stop) - 1 more)."""
    llm, url = server
    prompt = random_text(rng)
    stop = random_text(rng, 4, 8)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop=[stop])

    async def engine_texts():
        texts = []
        async for output in llm.generate(prompt, params, f"pace-{random.random()}"):
            texts.append(output.outputs[0].text)
        return texts
    expected = asyncio.run(asyncio.wait_for(engine_texts(), TIMEOUT))

    body = {"model": MODEL, "prompt": prompt, "max_tokens": 10, "temperature": 0,
            "ignore_eos": True, "stop": [stop], "stream": True}
    streamed = [""]
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                streamed.append(streamed[-1] + json.loads(line[6:])["choices"][0]["text"])

    def distinct(texts):
        return [t for i, t in enumerate(texts) if t and (i == 0 or t != texts[i - 1])]
    assert distinct(streamed) == distinct(expected)


def test_completion_n_and_batched_prompts_with_seed(server, client, rng):
    llm, _ = server
    prompts = [random_text(rng), random_text(rng)]
    seed = rng.randrange(2**30)
    params = SamplingParams(n=3, temperature=1.0, seed=seed, max_tokens=5, ignore_eos=True)
    expected = [[c.text for c in direct(llm, p, params).outputs] for p in prompts]
    reply = client.completions.create(model=MODEL, prompt=prompts, n=3, seed=seed,
                                      max_tokens=5, temperature=1.0,
                                      extra_body={"ignore_eos": True})
    by_index = {c.index: c.text for c in reply.choices}
    assert sorted(by_index) == list(range(6))
    assert [[by_index[i * 3 + j] for j in range(3)] for i in range(2)] == expected


def test_stop_string_cuts_text_whole_and_streamed(server, client, rng):
    llm, _ = server
    for _ in range(20):  # find a prompt whose greedy text holds a usable stop string
        prompt = random_text(rng)
        text = direct(llm, prompt, SamplingParams(temperature=0, max_tokens=12,
                                                  ignore_eos=True)).outputs[0].text
        stop = text[4:6]
        if len(text) > 6 and text.find(stop) > 0 and stop.strip() == stop:
            break
    else:
        pytest.skip("no greedy output with a usable stop string in 20 prompts")
    expected = text[:text.find(stop)]
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                      stop=[stop], extra_body={"ignore_eos": True})
    assert reply.choices[0].text == expected
    assert reply.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                         temperature=0, stop=stop, stream=True,
                                         extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_min_tokens_holds_off_a_stop_string_the_text_starts_with(server, client, rng):
    """A stop string the free greedy text completes within its first tokens does not end
    the completion before min_tokens; the text is the engine's for the same settings."""
    llm, _ = server
    prompt = random_text(rng)
    text = direct(llm, prompt, SamplingParams(temperature=0, max_tokens=12,
                                              ignore_eos=True)).outputs[0].text
    stop = text[:2].strip() or text[:4].strip()
    if not stop:
        pytest.skip(f"the greedy text {text!r} starts with spaces")
    min_tokens = rng.randint(6, 12)
    expected = direct(llm, prompt, SamplingParams(temperature=0, max_tokens=12, stop=[stop],
                                                  min_tokens=min_tokens)).outputs[0]
    assert len(expected.token_ids) >= min_tokens
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                      stop=[stop], extra_body={"min_tokens": min_tokens})
    assert reply.choices[0].text == expected.text
    assert reply.usage.completion_tokens == len(expected.token_ids)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=12,
        temperature=0, stop=[stop], extra_body={"min_tokens": min_tokens})
    assert chat.usage.completion_tokens >= min_tokens


def test_chat_uses_the_template_whole_and_streamed(server, client, rng):
    llm, _ = server
    messages = [{"role": "system", "content": random_text(rng)},
                {"role": "user", "content": random_text(rng)}]
    tokenizer = llm.engine.tokenizer
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages, True),
                                  add_special_tokens=False)
    assert prompt_ids.count(1) == 3  # the template's <s> markers, no extra BOS
    expected = direct(llm, prompt_ids, SamplingParams(temperature=0, max_tokens=6,
                                                      ignore_eos=True))
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.outputs[0].text
    assert reply.usage.prompt_tokens == len(prompt_ids)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                                 temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        expected.outputs[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_logprobs(server, client, rng):
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": random_text(rng)}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 2
        # Greedy: the sampled token is the most likely one.
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.logprob <= 0


def strict_json(text):
    """JSON as the standard has it: no NaN or Infinity (Python's json takes both)."""
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_logprobs_of_tokens_that_top_k_rules_out_are_finite_json(server, rng):
    """top_k gives every other token a logprob of -inf, which JSON cannot hold: a whole
    response was a 500 and a streamed one sent -Infinity. They are reported at the floor."""
    from shardline.entrypoints.logprobs import EXCLUDED_LOGPROB

    _, url = server
    top_k, wanted = rng.randint(1, 3), rng.randint(6, 20)
    common = {"model": MODEL, "max_tokens": rng.randint(2, 5), "top_k": top_k,
              "seed": rng.randrange(2**30)}
    requests = [
        ("/v1/completions", {**common, "prompt": random_text(rng), "logprobs": wanted}),
        ("/v1/chat/completions", {**common, "logprobs": True, "top_logprobs": wanted,
                                  "messages": [{"role": "user", "content": random_text(rng)}]}),
    ]
    for path, body in requests:
        whole = httpx.post(url + path, json=body, timeout=TIMEOUT)
        assert whole.status_code == 200, whole.text
        choices = [strict_json(whole.text)["choices"]]
        with httpx.stream("POST", url + path, json={**body, "stream": True},
                          timeout=TIMEOUT) as reply:
            choices += [strict_json(line[6:])["choices"] for line in reply.iter_lines()
                        if line.startswith("data: {")]
        for choice in (c for chunk in choices for c in chunk if c["logprobs"]):
            chat = "content" in choice["logprobs"]
            if chat:
                entries = choice["logprobs"]["content"]
                sampled = [e["logprob"] for e in entries]
                tops = [[t["logprob"] for t in e["top_logprobs"]] for e in entries]
            else:
                sampled = choice["logprobs"]["token_logprobs"]
                tops = [list(t.values()) for t in choice["logprobs"]["top_logprobs"]]
            assert all(EXCLUDED_LOGPROB < lp <= 0 for lp in sampled)
            for top in tops:
                assert sum(lp > EXCLUDED_LOGPROB for lp in top) <= top_k
                # Legacy alternatives are keyed by text, so ruled-out ones may share a key
                # with a likelier token; chat lists every one.
                assert EXCLUDED_LOGPROB in top or not chat


def test_legacy_top_logprobs_keep_the_most_likely_of_tokens_with_the_same_text(server, rng):
    """Byte tokens of tiny-llama all read U+FFFD: the key they share holds the most likely
    one's logprob, so the sampled token's text is never shown as less likely than it was."""
    _, url = server
    body = {"model": MODEL, "prompt": random_text(rng), "max_tokens": 12, "logprobs": 20,
            "seed": rng.randrange(2**30), "ignore_eos": True}
    reply = httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT).json()
    logprobs = reply["choices"][0]["logprobs"]
    for text, sampled, top in zip(logprobs["tokens"], logprobs["token_logprobs"],
                                  logprobs["top_logprobs"]):
        assert top[text] >= sampled
        assert list(top.values()) == sorted(top.values(), reverse=True)


def test_tokenizing_a_request_does_not_hold_up_the_server():
    """While one request's prompts are being tokenized (here: until /health has answered)
    the server answers others; tokenizing on the event loop stalled every stream."""
    from types import SimpleNamespace

    tokenizing, answered = threading.Event(), threading.Event()

    def encode_prompt(prompt, params):
        tokenizing.set()
        answered.wait(TIMEOUT)
        return None, list(prompt)

    stub = SimpleNamespace(tokenizer=None, max_model_len=64, shutdown=lambda: None,
                           encode_prompt=encode_prompt)
    llm = AsyncLLM.from_engine(stub)
    llm.shutdown()  # the request fails once tokenized: only the wait is under test
    with running_app(build_app(llm, MODEL)) as url:
        try:
            slow = threading.Thread(target=httpx.post, args=(url + "/v1/completions",),
                                    kwargs={"json": {"model": MODEL, "prompt": [5]},
                                            "timeout": TIMEOUT})
            slow.start()
            assert tokenizing.wait(TIMEOUT)
            assert httpx.get(url + "/health", timeout=5).status_code == 503
            answered.set()
            slow.join(TIMEOUT)
        finally:
            answered.set()


def test_bench_harness_online_against_the_server(server, tmp_path, rng):
    """`shardline bench --mode online --url` streams from this server: every request
    finishes with exactly its max_tokens (ignore_eos), at each rate of the sweep."""
    from shardline.cli import main

    dataset = tmp_path / "prompts.jsonl"
    max_tokens = [rng.randint(2, 6) for _ in range(5)]
    dataset.write_text("".join(
        json.dumps({"prompt": [rng.randrange(3, 250) for _ in range(rng.randint(3, 9))],
                    "max_tokens": n}) + "\n" for n in max_tokens))
    out = tmp_path / "runs.jsonl"
    assert main(["bench", "--mode", "online", "--url", server[1], "-m", MODEL,
                 "--dataset", str(dataset), "--request-rate", "inf,30", "--no-progress",
                 "--out", str(out)]) == 0
    runs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["results"]["request_rate"] for r in runs] == ["inf", 30.0]
    for run in runs:
        results = run["results"]
        assert run["target"] == server[1] and run["mode"] == "online"
        assert results["finished_requests"] == 5 and not results["interrupted"]
        assert results["output_tokens"] == sum(max_tokens)
        assert 0 < results["ttft_s"]["p50"] <= results["e2e_latency_s"]["p99"]


def test_each_prompt_is_validated_and_tokenized_once(server, client, rng, monkeypatch):
    """The server validates and tokenizes off the event loop; AsyncLLM then took the token
    ids as a prompt and validated every id again on the loop (0.2 s for a batch of 3000
    prompts, while every other stream waited)."""
    llm, _ = server
    calls = []
    encode = llm.engine.encode_prompt

    def counted(prompt, params):
        calls.append(prompt)
        return encode(prompt, params)

    monkeypatch.setattr(llm.engine, "encode_prompt", counted)
    prompts = [random_text(rng) for _ in range(rng.randint(2, 5))]
    reply = client.completions.create(model=MODEL, prompt=prompts, max_tokens=2)
    assert len(reply.choices) == len(prompts)
    assert calls == prompts


def test_chat_logprobs_bytes_are_the_tokens_own(rng):
    """A character split over byte tokens: each token's text is U+FFFD, and OpenAI's bytes
    field is what lets a client rebuild the character; it held the bytes of U+FFFD."""
    from shardline.engine.outputs import CompletionOutput
    from shardline.engine.tokenizer import Tokenizer
    from shardline.entrypoints.logprobs import Decode, chat_logprobs
    from shardline.presets import byte_tokenizer

    tokenizer = Tokenizer(byte_tokenizer())
    char = rng.choice("éß中字🙂🚀")
    ids = tokenizer.encode(char, add_special_tokens=False)
    completion = CompletionOutput(index=0, text=char, token_ids=ids,
                                  logprobs=[{t: -0.5} for t in ids])
    content = chat_logprobs(completion, Decode(tokenizer), top_n=1)["content"]
    assert [entry["token"] for entry in content] == ["\ufffd"] * len(ids)
    assert bytes(b for entry in content for b in entry["bytes"]) == char.encode()
    assert [entry["top_logprobs"][0]["bytes"] for entry in content] == \
        [entry["bytes"] for entry in content]


def test_a_message_name_reaches_the_chat_template(rng):
    """OpenAI's `name` of a message's participant was dropped before the template."""
    from shardline.engine.chat_template import render_chat
    from shardline.entrypoints.chat_protocol import ChatCompletionRequest

    name = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 8)))
    request = ChatCompletionRequest(model=MODEL, messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi", "name": name}])
    template = ("{% for m in messages %}{{ m.role }}{% if m.name %} ({{ m.name }}){% endif %}: "
                "{{ m.content }}\n{% endfor %}")
    assert render_chat(template, request.conversation(), False) == \
        f"system: be brief\nuser ({name}): hi\n"
