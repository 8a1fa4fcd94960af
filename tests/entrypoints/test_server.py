"""`shardline serve` end to end: the official openai client against the server, started
here in a thread on a free local port over tiny-llama (with a chat template added).

Expected tokens come from the same AsyncLLM called directly, so the server must hand the
engine exactly the prompt and sampling settings the request asked for. Every wait is
bounded; the server and the engine are always shut down.
"""

import asyncio
import json
import math
import os
import random
import re
import threading
import time

import pytest

fastapi = pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
openai = pytest.importorskip("openai", reason="the openai client (test extra) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (test extra) is not installed")

from shardline.engine.async_llm import AsyncLLM  # noqa: E402
from shardline.entrypoints.app import build_app  # noqa: E402
from shardline.sampling_params import SamplingParams  # noqa: E402

MODEL = "tiny-chat"
TIMEOUT = 30.0
def serve_in_thread(app):
    """Start uvicorn on a free local port in a thread; returns (server, thread, base URL)."""
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not srv.started:
        assert thread.is_alive(), "the server thread ended during startup"
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    return srv, thread, f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"


@pytest.fixture(scope="module")
def server(tiny_chat_model):
    """(AsyncLLM, base URL) of a server running in a thread; shut down after the module."""
    # The kernels are not under test here: the torch reference keeps the steps fast.
    previous = os.environ.get("SHARDLINE_DISABLE_TRITON")
    os.environ["SHARDLINE_DISABLE_TRITON"] = "1"
    llm = AsyncLLM(tiny_chat_model, block_size=4, num_kv_blocks=256, max_model_len=512)
    srv, thread, url = serve_in_thread(build_app(llm, MODEL))
    try:
        yield llm, url
    finally:
        srv.should_exit = True
        thread.join(TIMEOUT)
        llm.shutdown()
        if previous is None:
            os.environ.pop("SHARDLINE_DISABLE_TRITON", None)
        else:
            os.environ["SHARDLINE_DISABLE_TRITON"] = previous
    assert not thread.is_alive(), "the server thread did not stop"


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", timeout=TIMEOUT,
                         max_retries=0)


def random_text(rng, low=3, high=20):
    return "".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(low, high)))


def direct(llm, prompt, params):
    """The engine's own final output for `prompt`, bypassing HTTP."""
    async def run():
        final = None
        async for output in llm.generate(prompt, params, f"direct-{random.random()}"):
            final = output
        return final
    return asyncio.run(asyncio.wait_for(run(), TIMEOUT))


def wait_until(condition, what):
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def engine_idle(llm):
    engine = llm.engine
    return (not engine.has_unfinished_requests()
            and engine.kv.num_free_blocks == engine.kv.num_blocks)


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
    from shardline.entrypoints.serving import EXCLUDED_LOGPROB

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


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=2.0), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(extra_body={"logit_bias": {"5": 1}}), "logit_bias"),
    (dict(extra_body={"prompt": "x" * 600}), "prompt"),
    (dict(extra_body={"prompt": [[5, 6], [7, 10**6]]}), "prompt"),
    (dict(extra_body={"stop_token_ids": [2, 10**6]}), "stop_token_ids"),
    (dict(extra_body={"stream_options": {"include_usage": True}}), "stream_options"),
    (dict(model="nope"), "model"),
    (dict(n="many"), "n"),
])
def test_bad_request_is_400_naming_the_field_and_the_server_keeps_serving(
        server, client, kwargs, param):
    args = dict(model=MODEL, prompt="hello", max_tokens=2) | kwargs
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**args)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param, caught.value.body
    assert param in caught.value.body["message"]
    assert client.completions.create(model=MODEL, prompt="hello", max_tokens=2).choices
    assert engine_idle(server[0])


def test_n_beyond_the_limit_is_refused_and_the_limit_is_served(server, client, rng):
    """An n of 1e30 made the engine build sequences until the host ran out of memory; n is
    bounded by OpenAI's 128, which is served in full."""
    from shardline.entrypoints.protocol import MAX_N

    llm, _ = server
    for n in (rng.randint(MAX_N + 1, 4 * MAX_N), 10**30):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model=MODEL, prompt=random_text(rng), n=n, max_tokens=1)
        assert caught.value.body["param"] == "n" and str(MAX_N) in caught.value.body["message"]
    assert engine_idle(llm)
    reply = client.completions.create(model=MODEL, prompt=random_text(rng), n=MAX_N,
                                      max_tokens=1)
    assert sorted(c.index for c in reply.choices) == list(range(MAX_N))


def test_prompts_times_n_beyond_the_limit_is_refused_and_the_limit_is_served(server, client,
                                                                             rng):
    """A small body listing many prompts, each with n completions, built sequences on the
    event loop without bound; prompts x n is bounded, and the bound is served in full."""
    from shardline.entrypoints.protocol import MAX_COMPLETIONS

    llm, _ = server
    n = rng.choice([1, 2, 4, 8])
    over = [[rng.randrange(3, 200)] for _ in range(MAX_COMPLETIONS // n + rng.randint(1, 99))]
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=over, n=n, max_tokens=1)
    assert caught.value.body["param"] == "prompt"
    assert f"{len(over) * n} completions" in caught.value.body["message"]
    assert engine_idle(llm)
    reply = client.completions.create(model=MODEL, prompt=over[:MAX_COMPLETIONS // n], n=n,
                                      max_tokens=1)
    assert len(reply.choices) == MAX_COMPLETIONS


@pytest.mark.parametrize("kwargs, param", [
    (dict(max_completion_tokens=0), "max_completion_tokens"),
    (dict(top_logprobs=2), "top_logprobs"),
    (dict(logprobs=True, top_logprobs=99), "top_logprobs"),
    (dict(extra_body={"response_format": {"type": "json_object"}}), "response_format"),
    (dict(extra_body={"stop_token_ids": [10**6]}), "stop_token_ids"),
    (dict(extra_body={"stream_options": {"include_usage": False}}), "stream_options"),
])
def test_bad_chat_request_is_400_naming_the_field(server, client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}], **kwargs)
    assert caught.value.body["param"] == param, caught.value.body


@pytest.mark.parametrize("field, wrong_type", [
    ("max_tokens", lambda r: True), ("max_tokens", lambda r: str(r.randint(1, 9))),
    ("max_tokens", lambda r: float(r.randint(1, 9))), ("n", lambda r: str(r.randint(1, 3))),
    ("seed", lambda r: str(r.randrange(2**30))), ("logprobs", lambda r: True),
    ("temperature", lambda r: str(r.random())), ("stream", lambda r: r.choice(["yes", 1])),
    ("ignore_eos", lambda r: r.choice(["false", 0])),
    ("prompt", lambda r: [True] + [r.randrange(3, 250) for _ in range(r.randint(1, 5))]),
])
def test_a_value_of_the_wrong_type_is_refused_not_converted(server, rng, field, wrong_type):
    """`"max_tokens": true` is not 1 and `"stream": "yes"` is not true: each is a 400 naming
    the field, and the server keeps serving."""
    llm, url = server
    body = {"model": MODEL, "prompt": random_text(rng), "max_tokens": 2, field: wrong_type(rng)}
    reply = httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == field, reply.json()
    assert engine_idle(llm)
    body[field] = {"max_tokens": 2, "n": 1, "seed": 1, "logprobs": 1, "temperature": 1,
                   "stream": False, "ignore_eos": False, "prompt": [5, 6]}[field]
    assert httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT).status_code == 200


def test_bad_json_and_bad_chat_messages_are_400(server):
    url = server[1]
    reply = httpx.post(url + "/v1/completions", content=b"{not json", timeout=TIMEOUT)
    assert reply.status_code == 400 and "JSON" in reply.json()["error"]["message"]
    reply = httpx.post(url + "/v1/chat/completions", timeout=TIMEOUT,
                       json={"model": MODEL, "messages": [{"role": "user"}]})
    assert reply.status_code == 400
    assert reply.json()["error"]["param"].startswith("messages")
    reply = httpx.post(url + "/v1/chat/completions", timeout=TIMEOUT,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                             "tools": []})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "tools"


def test_a_lone_surrogate_or_deep_nesting_is_a_400_not_a_500(server, rng):
    """JSON can spell a lone UTF-16 surrogate, which is no text a tokenizer takes, and can
    nest past Python's recursion limit: both are bad bodies, refused before the engine."""
    llm, url = server
    text = random_text(rng)
    cut = rng.randint(0, len(text))
    lone = text[:cut] + chr(rng.randrange(0xD800, 0xE000)) + text[cut:]
    pair = text[:cut] + chr(rng.randrange(0x1F600, 0x1F650)) + text[cut:]
    depth = rng.randint(20_000, 40_000)
    bodies = [
        ("/v1/completions", {"model": MODEL, "prompt": lone, "max_tokens": 2}),
        ("/v1/chat/completions", {"model": MODEL, "max_tokens": 2,
                                  "messages": [{"role": "user", "content": lone}]}),
        ("/v1/completions", "[" * depth + "]" * depth),
    ]
    for path, body in bodies:
        content = body if isinstance(body, str) else json.dumps(body)
        reply = httpx.post(url + path, content=content.encode(), timeout=TIMEOUT)
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["type"] == "invalid_request_error"
        assert "not valid JSON" in reply.json()["error"]["message"]
    assert engine_idle(llm)
    reply = httpx.post(url + "/v1/completions", timeout=TIMEOUT, content=json.dumps(
        {"model": MODEL, "prompt": pair, "max_tokens": 2}).encode())
    assert reply.status_code == 200
    assert reply.json()["usage"]["prompt_tokens"] == len(llm.engine.tokenizer.encode(pair))


def aborts(llm):
    return llm.engine.step_metrics.finished["abort"]


@pytest.fixture
def slow_steps(server, monkeypatch):
    """Engine steps of at least 20 ms, so that a request of 400 tokens outlasts its client
    (8 s at the least) however fast this machine computes them."""
    engine = server[0].engine
    step = engine.step

    def slow_step():
        time.sleep(0.02)
        return step()
    monkeypatch.setattr(engine, "step", slow_step)


def test_streaming_client_that_disconnects_aborts_its_request(server, slow_steps):
    llm, url = server
    before = aborts(llm)
    body = {"model": MODEL, "prompt": "disconnect me", "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as reply:
        assert reply.status_code == 200
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert llm.engine.has_unfinished_requests()
    wait_until(lambda: aborts(llm) == before + 1 and engine_idle(llm), "the abort")
    llm.engine.kv.check_invariants()


def test_waiting_client_that_disconnects_aborts_its_request(server, slow_steps):
    llm, url = server
    before = aborts(llm)
    body = {"model": MODEL, "prompt": "disconnect me too", "max_tokens": 400,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body,
                   timeout=httpx.Timeout(TIMEOUT, read=0.5))
    wait_until(lambda: aborts(llm) == before + 1 and engine_idle(llm), "the abort")


SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$')


def parse_prometheus(text):
    """{(name, labels): value}; fails on any line that is not a comment or a sample."""
    samples, types = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
            continue
        if line.startswith("# HELP ") or not line:
            continue
        match = SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        samples[(match.group(1), match.group(2) or "")] = float(match.group(3))
    for name, _ in samples:
        base = re.sub(r"_(sum|count)$", "", name)
        assert name in types or base in types, f"{name} has no TYPE line"
    return samples, types


def test_metrics_endpoint_is_prometheus_text(server, client):
    llm, url = server
    client.completions.create(model=MODEL, prompt="count me", max_tokens=3)
    reply = httpx.get(url + "/metrics", timeout=TIMEOUT)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    samples, types = parse_prometheus(reply.text)
    metrics = asyncio.run(llm.metrics())
    assert samples[("shardline_kv_blocks_total", "")] == llm.engine.kv.num_blocks
    assert samples[("shardline_num_requests_running", "")] == 0
    assert samples[("shardline_steps_total", "")] == metrics["num_steps"] > 0
    assert samples[("shardline_generation_tokens_total", "")] == \
        metrics["generation_tokens_total"] >= 3
    assert samples[("shardline_step_time_seconds_count", "")] == metrics["num_steps"]
    assert types["shardline_step_time_seconds"] == "summary"
    p50 = samples[("shardline_step_time_seconds", '{quantile="0.5"}')]
    assert 0 < p50 <= samples[("shardline_step_time_seconds", '{quantile="0.99"}')]
    assert not math.isnan(samples[("shardline_prefix_cache_hit_rate", "")])


def test_models_and_health(server, client, rng):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL) == models.data[0]
    other = MODEL + "-" + random_text(rng).replace(" ", "")
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve(other)
    assert caught.value.body["param"] == "model" and other in caught.value.body["message"]
    reply = httpx.get(server[1] + "/health", timeout=TIMEOUT)
    assert reply.status_code == 200 and reply.json() == {"status": "ok"}
    probe = httpx.head(server[1] + "/health", timeout=TIMEOUT)
    assert probe.status_code == 200 and probe.content == b""


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/v1/nope", 404), ("POST", "/v1/completion", 404), ("GET", "/v1/completions", 405),
    ("POST", "/v1/models", 405), ("DELETE", "/health", 405), ("PUT", "/metrics", 405),
])
def test_an_unknown_route_or_method_is_an_openai_error(server, method, path, status):
    reply = httpx.request(method, server[1] + path, timeout=TIMEOUT)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] is None
    assert error["message"].startswith(f"{method} {path}: ")
    if status == 405:
        assert reply.headers["allow"] in error["message"]


def test_a_stopped_engine_fails_health_and_requests_with_its_reason():
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    stub = SimpleNamespace(tokenizer=None, max_model_len=64, shutdown=lambda: None,
                           encode_prompt=lambda prompt, params: (None, [1]))
    llm = AsyncLLM.from_engine(stub)
    llm.shutdown()
    with TestClient(build_app(llm, MODEL)) as http:
        health = http.get("/health")
        assert health.status_code == 503 and "shut down" in health.json()["message"]
        assert http.head("/health").status_code == 503
        for stream in (False, True):
            reply = http.post("/v1/completions",
                              json={"model": MODEL, "prompt": [5], "stream": stream})
            assert reply.status_code == 500
            assert "shut down" in reply.json()["error"]["message"]


def test_an_unexpected_engine_error_is_a_500_in_openai_format(rng):
    """An exception the server does not expect (a defect) is still an error body an OpenAI
    client reads, naming the exception, not a bare 'Internal Server Error'."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    detail = random_text(rng)

    def encode_prompt(prompt, params):
        raise TypeError(detail)

    stub = SimpleNamespace(tokenizer=None, max_model_len=64, shutdown=lambda: None,
                           encode_prompt=encode_prompt)
    llm = AsyncLLM.from_engine(stub)
    with TestClient(build_app(llm, MODEL), raise_server_exceptions=False) as http:
        reply = http.post("/v1/completions", json={"model": MODEL, "prompt": [5]})
    llm.shutdown()
    assert reply.status_code == 500
    assert reply.json()["error"] == {"message": f"TypeError: {detail}", "type": "server_error",
                                     "param": None, "code": None}


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
    srv, thread, url = serve_in_thread(build_app(llm, MODEL))
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
        srv.should_exit = True
        thread.join(TIMEOUT)
    assert not thread.is_alive()


def test_chat_with_a_model_without_a_template_points_to_completions():
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    tokenizer = SimpleNamespace(chat_template=None)
    stub = SimpleNamespace(tokenizer=tokenizer, max_model_len=64, shutdown=lambda: None)
    llm = AsyncLLM.from_engine(stub)
    with TestClient(build_app(llm, MODEL)) as http:
        reply = http.post("/v1/chat/completions",
                          json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    llm.shutdown()
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"
    message = reply.json()["error"]["message"]
    assert "has no chat template" in message and "/v1/completions" in message


def test_per_rank_step_times_render_as_one_labelled_summary():
    from shardline.entrypoints.prometheus import render

    stats = {"count": 7, "sum": 0.7, "mean": 0.1, "p50": 0.1, "p90": 0.2, "p99": 0.3,
             "max": 0.3}
    metrics = {"num_requests_running": 1, "num_requests_waiting": 0, "kv_blocks_used": 3,
               "kv_blocks_total": 8, "kv_usage": 0.375, "prefix_cache_hit_rate": None,
               "generation_tokens_per_s": 1.5, "computed_tokens_per_s": 2.5,
               "num_preemptions": 0, "num_steps": 7, "generation_tokens_total": 7,
               "computed_tokens_total": 20,
               "finished_completions": {"stop": 1, "length": 2, "abort": 3},
               "step_time_s": stats,
               "step_time_per_rank_s": [dict(stats, rank=0), dict(stats, rank=1, p99=0.5)]}
    samples, types = parse_prometheus(render(metrics))
    assert types["shardline_rank_step_time_seconds"] == "summary"
    assert samples[("shardline_rank_step_time_seconds", '{rank="1",quantile="0.99"}')] == 0.5
    assert samples[("shardline_rank_step_time_seconds_count", '{rank="0"}')] == 7
    assert samples[("shardline_finished_completions_total", '{reason="abort"}')] == 3
    assert math.isnan(samples[("shardline_prefix_cache_hit_rate", "")])


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
    assert [r["results"]["request_rate"] for r in runs] == [math.inf, 30.0]
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
    from shardline.entrypoints.serving import Decode, chat_logprobs
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
    from shardline.entrypoints.protocol import ChatCompletionRequest

    name = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 8)))
    request = ChatCompletionRequest(model=MODEL, messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi", "name": name}])
    template = ("{% for m in messages %}{{ m.role }}{% if m.name %} ({{ m.name }}){% endif %}: "
                "{{ m.content }}\n{% endfor %}")
    assert render_chat(template, request.conversation(), False) == \
        f"system: be brief\nuser ({name}): hi\n"
