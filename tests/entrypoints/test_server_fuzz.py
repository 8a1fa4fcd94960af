"""Random request bodies against `shardline serve`'s app: valid-shaped ones with edge
values, wrong types, nested garbage, huge numbers, odd unicode and raw bytes that are no
JSON, on /v1/completions and /v1/chat/completions, whole and streamed, several at once.

Each must be answered with a 200 (a stream that ends with [DONE] and carries no error
event) or a 4xx in OpenAI's error format, whose `param` names a field when the body is a
JSON object; never a 5xx, never a hang. Afterwards the server still answers a plain
request, is healthy, and the engine is idle with every KV block free.
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx", reason="httpx (test extra) is not installed")
pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")

from server_helpers import MODEL, TIMEOUT, engine_idle, wait_until  # noqa: E402

BODIES = 80
# Values that are wrong somewhere: wrong types, out of range, huge, odd text.
GARBAGE = [None, True, 0, -1, 2**63, 10**40, 1.5, -0.0, 1e308, "", "x", "\U0001F600",
           "\x00", [], [None], {}, {"a": [1, {"b": None}]}, [[[]]], "NaN", 2**64]
ODD_TEXT = ["\n", "\U0001F600", "\u00e9", "\ufffd", "<s>", "\u2028", "zz", " "]
# Raw bodies that are not a request: not JSON, not an object, or JSON Python reads and
# pydantic refuses (NaN, a number past float, a lone surrogate, deep nesting).
RAW = [b"", b"{", b"[]", b"null", b'"x"', b"\xff\xfe", b"[" * 3000 + b"]" * 3000,
       b'{"model": "tiny-chat", "prompt": "\\ud800"}',
       b'{"model": "tiny-chat", "prompt": "a", "temperature": NaN}',
       b'{"model": "tiny-chat", "prompt": "a", "max_tokens": 1e400}',
       b'{"model": "tiny-chat", "prompt": "a", "max_tokens": 1.0}']


def pick(rng: random.Random, valid: list, invalid: list, wild: bool) -> object:
    """A valid value, or in a wild body now and then an invalid one."""
    return rng.choice(invalid if wild and invalid and rng.random() < 0.3 else valid)


def sampling_fields(rng: random.Random, wild: bool) -> dict:
    """A random few of the fields both endpoints take, at edge values: (valid, invalid)."""
    choices = {
        "n": ([1, 2, 3], [0, 129]), "temperature": ([0, 1e-5, 1.0, 1e4], [1e-8, -1]),
        "top_p": ([1e-9, 0.5, 1.0], [0]), "top_k": ([-1, 1, 319, 321, 2**63 - 1], [0]),
        "min_p": ([0, 0.5, 1.0], [2]), "seed": ([0, -2**63, 2**64 - 3], [2**64]),
        "presence_penalty": ([-2, 2], [2.5]), "frequency_penalty": ([-2, 2], [-3]),
        "repetition_penalty": ([1e-5, 1e5], [0]),
        "stop": (["\n", [rng.choice(ODD_TEXT)], [str(i) for i in range(50)]], ["", [""]]),
        "stop_token_ids": ([[2], [0, 1], [319]], [[320]]),
        "allowed_token_ids": ([[2], [5, 6, 7], list(range(320))], [[], [320]]),
        "logit_bias": ([{}, {"5": 100}, {"2": -100}], [{"320": 1}, {"x": 1}, {"5": 101}]),
        "min_tokens": ([0, 1, 4], [2**63 - 1]), "ignore_eos": ([True, False], []),
        "skip_special_tokens": ([True, False], []), "stream": ([True, False, None], []),
        "prompt_logprobs": ([0, 1, 20], [21]), "user": (["u"], []),
    }
    fields = {name: pick(rng, *values, wild) for name, values in choices.items()
              if rng.random() < 0.25}
    if fields.get("stream") and rng.random() < 0.5:
        fields["stream_options"] = {"include_usage": rng.random() < 0.5}
    return fields


def random_prompt(rng: random.Random, wild: bool) -> object:
    return pick(rng, [
        "".join(rng.choice(ODD_TEXT + ["a", "b"]) for _ in range(rng.randint(1, 30))),
        [rng.randrange(320) for _ in range(rng.randint(1, 40))],
        ["ab", "c\u00e9"], [[5, 6], [7]], [5] * 512,
    ], ["", [], [[]], [1.0], [True], [-1], [320], [[1, 2], []], [5] * 513, "x" * 600], wild)


def random_messages(rng: random.Random, wild: bool) -> object:
    valid = [{"role": rng.choice(["system", "user", "assistant"]),
              "content": rng.choice(["".join(rng.choices(ODD_TEXT, k=4)),
                                     [{"type": "text", "text": "hi"}]])}
             for _ in range(rng.randint(1, 3))]
    return pick(rng, [valid], [[], [{"role": "user"}], [{"role": "bot", "content": "x"}],
                               [{"role": "user", "content": [{"type": "image_url"}]}],
                               [{"role": "user", "content": []}], "hi", [{"role": "tool"}]],
                wild)


def random_body(rng: random.Random, chat: bool) -> dict:
    """A valid-shaped body; a wild one (a third) may hold invalid values, a value of a
    wrong kind in any field, the model's included, or a field the server does not take."""
    wild = rng.random() < 0.35
    body = {"model": MODEL, **sampling_fields(rng, wild)}
    if chat:
        body["messages"] = random_messages(rng, wild)
        extra = {"max_completion_tokens": ([1, 3], [-1]), "logprobs": ([True, False], []),
                 "add_generation_prompt": ([True, False], [])}
        if body.get("logprobs") or wild:
            extra["top_logprobs"] = ([0, 5, 20], [21])
    else:
        body["prompt"] = random_prompt(rng, wild)
        extra = {"logprobs": ([0, 1, 5], [21]), "echo": ([True, False], []),
                 "best_of": ([1], [2]), "suffix": ([None], ["x"])}
    body["max_tokens"] = pick(rng, [1, 4, 8], [0, 2**63 - 1, None], wild)
    body.update((name, pick(rng, *values, wild)) for name, values in extra.items()
                if rng.random() < 0.3)
    if wild and rng.random() < 0.5:
        body[rng.choice(list(body))] = rng.choice(GARBAGE)
    if wild and rng.random() < 0.1:
        body[rng.choice(["foo", "tools", "functions"])] = rng.choice(GARBAGE[1:])
    return body


def check_response(response, body: object) -> None:
    assert response.status_code < 500, (body, response.status_code, response.text[:500])
    if response.status_code != 200:
        error = response.json()["error"]
        assert error["message"] and error["type"], error
        if isinstance(body, dict) and response.status_code == 400:
            assert error["param"], (body, error)
        return
    if isinstance(body, dict) and body.get("stream") is True:
        events = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", response.text[-300:]
        for event in events[:-1]:
            assert "error" not in json.loads(event), event
        return
    choices = response.json()["choices"]
    assert choices and all(c["finish_reason"] in ("stop", "length") for c in choices)


def send(url: str, seed: int) -> None:
    rng = random.Random(seed)
    chat = rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"
    with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        if rng.random() < 0.1:
            body: object = rng.choice(RAW)
            response = client.post(path, content=body,
                                   headers={"content-type": "application/json"})
        else:
            body = random_body(rng, chat)
            response = client.post(path, json=body)
    check_response(response, body)


def test_random_bodies_get_a_200_or_a_4xx_naming_the_field(server, rng):
    llm, url = server
    seeds = [rng.randrange(2**32) for _ in range(BODIES)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda seed: send(url, seed), seeds))
    with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        reply = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi",
                                                     "max_tokens": 2})
        assert reply.status_code == 200 and reply.json()["choices"]
        assert client.get("/health").status_code == 200
    wait_until(lambda: engine_idle(llm), "the engine to be idle")
