"""`shardline serve` refusing what it cannot serve: a bad request is a 400 in OpenAI's
format naming the field, a client that leaves aborts its request, and an engine that
stopped or failed is a 5xx that says why; after each, the server keeps serving.
"""

import asyncio
import json
import socket
import threading
import time

import pytest

fastapi = pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
openai = pytest.importorskip("openai", reason="the openai client (test extra) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (test extra) is not installed")

from shardline.engine.async_llm import AsyncLLM  # noqa: E402
from shardline.entrypoints.app import build_app  # noqa: E402
from server_helpers import MODEL, TIMEOUT, engine_idle, random_text, wait_until  # noqa: E402


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=2.0), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(extra_body={"logit_bias": {"5": 101}}), "logit_bias"),
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


def test_tool_use_the_chat_template_does_not_render_is_refused_naming_it(server, rng):
    """tiny-chat's template writes each message's role and content, so it would drop the
    tools and an assistant's tool calls (and write "None" for its content): each is a 400
    naming where it is. Its tool results it writes, as any turn."""
    llm, url = server
    call = {"id": f"call_{rng.randrange(999)}", "type": "function",
            "function": {"name": "f", "arguments": '{"x": 1}'}}
    tool = {"role": "tool", "tool_call_id": call["id"], "content": random_text(rng)}
    user = {"role": "user", "content": random_text(rng)}
    for body, param, message in [
            ({"messages": [user], "tools": [{"type": "function", "function": {"name": "f"}}]},
             "tools", "tools: the chat template never reads `tools`"),
            ({"messages": [user, {"role": "assistant", "tool_calls": [call]}, tool]},
             "messages.1.tool_calls",
             "messages[1].tool_calls: the chat template never reads a message's tool_calls")]:
        reply = httpx.post(url + "/v1/chat/completions", timeout=TIMEOUT,
                           json={"model": MODEL, "max_tokens": 2, **body})
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["param"] == param
        assert reply.json()["error"]["message"].startswith(message)
    assert engine_idle(llm)


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


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_is_413_and_the_server_keeps_serving(
        server, client, monkeypatch, rng, declared):
    from shardline.entrypoints import app

    limit = rng.randint(1000, 5000)
    monkeypatch.setattr(app, "MAX_BODY_BYTES", limit)
    body = json.dumps({"model": MODEL, "prompt": random_text(rng, limit, limit + 100),
                       "max_tokens": 1})
    content = body.encode() if declared else iter([body[:limit // 2].encode(),
                                                   body[limit // 2:].encode()])
    reply = httpx.post(server[1] + "/v1/completions", content=content, timeout=TIMEOUT,
                       headers={"content-type": "application/json"})
    assert reply.status_code == 413
    error = reply.json()["error"]
    assert str(limit) in error["message"] and error["type"] == "invalid_request_error"
    assert client.completions.create(model=MODEL, prompt="hello", max_tokens=2).choices


def test_a_refused_body_ends_its_connection_after_the_linger(server, monkeypatch, rng):
    """A client declaring 1 TiB, and writing for as long as it can, gets the 413 at once
    and its connection closed REFUSED_BODY_LINGER later: kept open, the server read and
    dropped the whole declared body (0.3 s of CPU a GiB) for as long as the client sent."""
    from shardline.entrypoints import app

    linger = rng.uniform(0.2, 0.6)
    monkeypatch.setattr(app, "REFUSED_BODY_LINGER", linger)
    port = int(server[1].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=linger + 5) as sock:
        start = time.monotonic()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                     % (1 << 40))
        writer = threading.Thread(target=_write_until_refused, args=(sock,), daemon=True)
        writer.start()
        reply, closed = b"", None
        while closed is None:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            except socket.timeout:
                break
            if not data:
                closed = time.monotonic()
            elif not reply:
                answered = time.monotonic()
            reply += data
    writer.join(TIMEOUT)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert closed is not None, f"the connection was still open {linger + 5:.1f} s after the 413"
    assert closed - start >= linger and closed - answered < linger + 2, (start, answered,
                                                                         closed, linger)
    assert b"connection: close" in head.lower()


def _write_until_refused(sock):
    chunk = b" " * 65536
    try:
        while True:
            sock.sendall(chunk)
    except OSError:
        pass


def test_openai_clients_writing_a_body_over_the_limit_read_the_413(server, monkeypatch, rng):
    """The openai clients (httpx) write the whole body before reading: closing the
    connection at once after the 413 reset AsyncOpenAI's, which raised APIConnectionError
    instead of the 413."""
    from shardline.entrypoints import app

    limit = rng.randint(1000, 5000)
    monkeypatch.setattr(app, "MAX_BODY_BYTES", limit)
    prompt = random_text(rng, 10, 20) * rng.randint(400_000, 800_000)
    args = dict(model=MODEL, prompt=prompt, max_tokens=1)
    base = server[1] + "/v1"
    with pytest.raises(openai.APIStatusError) as caught:
        openai.OpenAI(base_url=base, api_key="unused", max_retries=0).completions.create(**args)
    assert caught.value.status_code == 413

    async def ask_async():
        client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0)
        async with client:
            await client.completions.create(**args)

    with pytest.raises(openai.APIStatusError) as caught:
        asyncio.run(asyncio.wait_for(ask_async(), TIMEOUT))
    assert caught.value.status_code == 413 and str(limit) in caught.value.message


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


def test_a_failed_engine_tells_clients_one_line_and_logs_the_rest(rng, caplog):
    """A dead worker's error carries its Python traceback (the server's files and code):
    a client gets its first line, in the error body, the stream's error event and
    /health; the whole error is in the server's log, once."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from shardline import EngineDeadError

    headline = f"worker rank {rng.randrange(8)} (pid {rng.randrange(2, 2**22)}) exited with " \
               f"code {rng.randrange(1, 256)}"
    trace = f'Traceback (most recent call last):\n  File "/srv/{random_text(rng)}.py"'

    def step():
        raise EngineDeadError(f"{headline}\n{trace}")

    stub = SimpleNamespace(tokenizer=None, max_model_len=64, shutdown=lambda: None,
                           encode_prompt=lambda prompt, params: (None, [1]),
                           add_request=lambda *args, **kwargs: None, step=step,
                           has_unfinished_requests=lambda: True)
    llm = AsyncLLM.from_engine(stub)
    with caplog.at_level("ERROR", logger="shardline"), TestClient(build_app(llm, MODEL)) as http:
        events = http.post("/v1/completions",
                           json={"model": MODEL, "prompt": [5], "stream": True}).text
        replies = [http.post("/v1/completions", json={"model": MODEL, "prompt": [5],
                                                      "stream": stream})
                   for stream in (False, True)]
        health = http.get("/health")
    llm.shutdown()
    [event] = [json.loads(line.removeprefix("data: ")) for line in events.splitlines()
               if line.startswith("data: {")]
    told = [event["error"]["message"], replies[0].json()["error"]["message"],
            health.json()["message"]]
    assert replies[0].status_code == 500 and health.status_code == 503
    assert replies[1].status_code == 500
    for message in told:
        assert headline in message and "the rest is in the server's log" in message
        assert "Traceback" not in message and "\n" not in message
    logged = [r.getMessage() for r in caplog.records if trace in r.getMessage()]
    assert len(logged) == 1 and headline in logged[0]


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
