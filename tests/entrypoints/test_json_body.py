"""decode_body: a JSON body with a lone UTF-16 surrogate escape is refused naming the
escape, where it starts and the field that holds it; the escapes of a pair, and text that
only looks like an escape, decode. The server answers such a body with that 400, and one
nested too deep with pydantic's, and serves the next request."""

import json

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (test extra) is not installed")

from shardline.entrypoints.json_body import decode_body  # noqa: E402
from shardline.entrypoints.protocol import RequestError  # noqa: E402
from server_helpers import MODEL, TIMEOUT, engine_idle, random_text  # noqa: E402

B = "\\"


def escape(code: int) -> str:
    return f"{B}u{code:04x}"


def random_word(rng):
    return "".join(rng.choice("abc xyz") for _ in range(rng.randint(0, 6)))


def lone_cases(rng):
    """JSON texts with a lone escape of each kind (a high half alone, before text or
    another escape; a low half alone or after a pair), each with the lone escape's offset."""
    high, low = rng.randrange(0xD800, 0xDC00), rng.randrange(0xDC00, 0xE000)
    word = random_word(rng)
    inners = [(escape(high), 0), (escape(high) + "x", 0), (escape(high) + B + "n", 0),
              (escape(high) + escape(high) + escape(low), 0), (escape(low), 0),
              (escape(high) + "a" + escape(low), 0),
              (escape(high) + escape(low) + escape(low), 12)]
    for inner, offset in inners:
        for text in (f'{{"a": [1, {{"k": "{word}{inner}"}}]}}', f'{{\n "{word}{inner}": 1}}',
                     f'[\n\n"{word}{inner}"]'):
            yield text, text.index(word + inner) + len(word) + offset


def test_each_kind_of_lone_surrogate_is_named_with_where_it_starts(rng):
    for text, start in lone_cases(rng):
        with pytest.raises(RequestError) as refused:
            decode_body(text.encode())
        line = text.count("\n", 0, start) + 1
        column = start - text.rfind("\n", 0, start)
        message = str(refused.value)
        assert message.startswith(
            f"the body holds an unpaired UTF-16 surrogate escape, {text[start:start + 6]}, "), text
        assert f"(line {line}, column {column}): it spells no character" in message, text


def test_the_field_is_named_and_a_key_by_its_path(rng):
    word = random_word(rng)
    lone = escape(rng.randrange(0xD800, 0xE000))
    for text, path in [(f'{{"m": [{{"c": "{word}"}}, {{"c": "{word}{lone}"}}]}}', "m.1.c"),
                       (f'{{"m": {{"{word}{lone}": 1}}}}', f"m.{word}{lone}"),
                       (f'{{"a": "{word}", "b": "{lone}", "{lone}": 1}}', "b"),
                       (f'"{word}{lone}"', None)]:
        with pytest.raises(RequestError) as refused:
            decode_body(text.encode())
        assert refused.value.param == path
        assert (f" in {path} (line 1, " in str(refused.value)) == (path is not None)


def test_pairs_and_escaped_backslashes_decode(rng):
    word = random_word(rng)
    high, low = rng.randrange(0xD800, 0xDC00), rng.randrange(0xDC00, 0xE000)
    text = f'{{"{word}": "{escape(high)}{escape(low)}{B}{B}ud800{B}"{escape(0xe9)}"}}'
    assert decode_body(text.encode()) == json.loads(text)


def test_other_bad_json_keeps_pydantics_words(rng):
    for text in ('{"a": "x', '{"a": "\\u12G4"}', '{"a" 1}'):
        with pytest.raises(RequestError) as refused:
            decode_body(text.encode())
        assert str(refused.value).startswith("the body is not valid JSON: ")
        assert refused.value.param is None


def test_a_lone_surrogate_or_deep_nesting_is_a_400_not_a_500(server, rng):
    """JSON can spell a lone UTF-16 surrogate, which is no text a tokenizer takes, and can
    nest past Python's recursion limit: both are bad bodies, refused before the engine. The
    surrogate's refusal was pydantic's "unexpected end of hex escape at line 1 column 40";
    it names the escape, its field and where it starts."""
    llm, url = server
    text = random_text(rng)
    cut = rng.randint(0, len(text))
    surrogate = rng.randrange(0xD800, 0xE000)
    lone = text[:cut] + chr(surrogate) + text[cut:]
    pair = text[:cut] + chr(rng.randrange(0x1F600, 0x1F650)) + text[cut:]
    for path, body, field in [
            ("/v1/completions", {"model": MODEL, "prompt": lone, "max_tokens": 2}, "prompt"),
            ("/v1/chat/completions", {"model": MODEL, "max_tokens": 2, "messages": [
                {"role": "user", "content": text}, {"role": "assistant", "content": lone}]},
             "messages.1.content")]:
        content = json.dumps(body, indent=rng.choice([None, 1]))
        start = content.index(f"\\u{surrogate:04x}")
        line, column = content.count("\n", 0, start) + 1, start - content.rfind("\n", 0, start)
        reply = httpx.post(url + path, content=content.encode(), timeout=TIMEOUT)
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == field
        assert error["message"].startswith(
            f"the body holds an unpaired UTF-16 surrogate escape, \\u{surrogate:04x}, in "
            f"{field} (line {line}, column {column}): it spells no character"), error
    depth = rng.randint(20_000, 40_000)
    reply = httpx.post(url + "/v1/completions", content=("[" * depth + "]" * depth).encode(),
                       timeout=TIMEOUT)
    assert reply.status_code == 400, reply.text
    assert "not valid JSON" in reply.json()["error"]["message"]
    assert engine_idle(llm)
    reply = httpx.post(url + "/v1/completions", timeout=TIMEOUT, content=json.dumps(
        {"model": MODEL, "prompt": pair, "max_tokens": 2}).encode())
    assert reply.status_code == 200
    assert reply.json()["usage"]["prompt_tokens"] == len(llm.engine.tokenizer.encode(pair))


def test_the_body_is_decoded_and_checked_off_the_event_loop(server, rng, monkeypatch):
    """On the event loop, a large body's decoding held up every other stream: a 30 MB chat
    body with a lone surrogate escape at its end (whose diagnosis reads each string before
    it) stalled another stream for 7.2 s; off the loop, 0.5 s."""
    import asyncio

    from shardline.entrypoints import app

    on_loop = []

    def watched(function):
        def call(*args):
            try:
                on_loop.append((function.__name__, asyncio.get_running_loop() is not None))
            except RuntimeError:   # no event loop runs in this thread
                on_loop.append((function.__name__, False))
            return function(*args)
        return call

    monkeypatch.setattr(app, "decode_body", watched(app.decode_body))
    monkeypatch.setattr(app, "parse", watched(app.parse))
    llm, url = server
    text = random_text(rng)
    for body in ({"model": MODEL, "prompt": text, "max_tokens": 1},
                 {"model": MODEL, "prompt": text + chr(rng.randrange(0xD800, 0xE000))}):
        httpx.post(url + "/v1/completions", content=json.dumps(body).encode(),
                   timeout=TIMEOUT)
    assert on_loop == [("decode_body", False), ("parse", False), ("decode_body", False)]
    assert engine_idle(llm)
