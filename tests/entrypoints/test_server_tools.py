"""Tool use on /v1/chat/completions, served over a model whose chat template knows tools:
a conversation with tools, tool calls and their results (as the openai client sends
them) is rendered into the prompt transformers' apply_chat_template gives, and malformed
tool use is a 400 naming the field, after which the server keeps serving."""

import json
import os

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
openai = pytest.importorskip("openai", reason="the openai client (test extra) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (test extra) is not installed")

from server_helpers import MODEL, TIMEOUT, engine_idle, random_text  # noqa: E402

TOOL_TEMPLATE = (
    "{%- if tools is not none %}<s>tools: {{ tools | tojson }}\n{% endif %}"
    "{%- for m in messages %}<s>{{ m.role }}"
    "{%- if m.role == 'tool' %} ({{ m.tool_call_id }}){% endif %}: "
    "{%- if m.content is defined %}{{ m.content }}{% endif %}"
    "{%- for call in m.tool_calls or [] %} <call>{{ call.function | tojson }}</call>"
    "{%- endfor %}\n{% endfor %}"
    "{%- if add_generation_prompt %}<s>assistant:{% endif %}")


@pytest.fixture(scope="module")
def tiny_chat_model(chat_model_with):
    """tiny-llama with TOOL_TEMPLATE as its chat template: conftest's `server` serves it in
    this module (overriding the session's tiny_chat_model)."""
    return chat_model_with(TOOL_TEMPLATE)


def tool_chat(rng):
    """(tools, messages) as an OpenAI client sends them: the user's question, the
    assistant's tool calls (arguments as JSON text, content null), a tool message with each
    call's result, and maybe the assistant's answer and the next question (short: the
    byte-level tiny-llama's context is 512 tokens)."""
    def text():
        return random_text(rng, 1, 6)
    names = rng.sample(["weather", "time_in", "add"], rng.randint(1, 2))
    tools = [{"type": "function", "function": {"name": name, "description": text(),
                                               "parameters": {"type": "object"}}}
             for name in names]
    calls = [{"id": f"call_{i}_{rng.randrange(100)}", "type": "function",
              "function": {"name": rng.choice(names),
                           "arguments": json.dumps({"x": text(), "n": rng.randint(0, 99)})}}
             for i in range(rng.randint(1, 2))]
    messages = [{"role": "user", "content": text()},
                {"role": "assistant", "content": None, "tool_calls": calls}]
    messages += [{"role": "tool", "tool_call_id": call["id"], "content": text()}
                 for call in calls]
    if rng.random() < 0.5:
        messages += [{"role": "assistant", "content": text()},
                     {"role": "user", "content": text()}]
    return tools, messages


def as_transformers_takes_it(messages):
    """The messages in Hugging Face's format: a call's arguments as an object."""
    return [{**m, "tool_calls": [{**call, "function": {**call["function"], "arguments":
                                                       json.loads(call["function"]["arguments"])}}
                                 for call in m["tool_calls"]]} if "tool_calls" in m else m
            for m in messages]


def test_a_tool_conversation_is_served_with_the_prompt_transformers_renders(
        server, tiny_chat_model, rng):
    """A tool message was a 400 (role 'tool' not among the roles taken), as were an
    assistant message's tool_calls and `tools`."""
    transformers = pytest.importorskip("transformers")
    llm, url = server
    tools, messages = tool_chat(rng)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(tiny_chat_model, "tokenizer.json"))
    for given in (tools, None):
        text = hf.apply_chat_template(as_transformers_takes_it(messages), tools=given,
                                      chat_template=TOOL_TEMPLATE, tokenize=False,
                                      add_generation_prompt=True)
        ids = llm.engine.tokenizer.encode(text, add_special_tokens=False)
        body = {"model": MODEL, "messages": messages, "max_tokens": 2, "prompt_logprobs": 0}
        if given:
            body |= {"tools": given, "tool_choice": "auto"}
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=TIMEOUT, json=body)
        assert reply.status_code == 200, reply.text
        answer = reply.json()
        assert answer["usage"]["prompt_tokens"] == len(ids)
        assert [int(next(iter(p))) for p in answer["prompt_logprobs"][1:]] == ids[1:]
    assert engine_idle(llm)


def _set(path, value):
    """A change to (tools, messages): `value` at `path`, or the key removed for None."""
    def change(tools, messages):
        body = {"tools": tools, "messages": messages}
        *head, last = path
        owner = body
        for part in head:
            owner = owner[part]
        if value is None:
            del owner[last]
        else:
            owner[last] = value
    return change


BAD = [  # (change, the field's path, the message's words after it)
    (_set(("messages", 2, "tool_call_id"), None), "messages.2.tool_call_id",
     "is required in a tool message"),
    (_set(("messages", 2, "content"), None), "messages.2.content",
     "is required in a tool message"),
    (_set(("messages", 2, "tool_call_id"), "call_unknown"), "messages.2.tool_call_id",
     "'call_unknown' answers no tool call"),
    (_set(("messages", 1, "tool_calls", 0, "function", "arguments"), "{'x': 1}"),
     "messages.1.tool_calls.0.function.arguments", ": must be the JSON text of an object"),
    (_set(("messages", 1, "tool_calls", 0, "function", "arguments"), "[1]"),
     "messages.1.tool_calls.0.function.arguments", ": must be the JSON text of an object"),
    (_set(("messages", 1, "tool_calls", 0, "function", "arguments"),
          '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}"),   # was a RecursionError: a 500
     "messages.1.tool_calls.0.function.arguments", ": nests too deeply to decode"),
    (_set(("messages", 1, "tool_calls", 0, "id"), None), "messages.1.tool_calls.0.id",
     "is required"),
    (_set(("messages", 1, "tool_calls", 0, "type"), "custom"), "messages.1.tool_calls.0.type",
     ": Input should be 'function'"),
    (_set(("messages", 1, "tool_calls"), None), "messages.1.content",
     "is required (only an assistant message with tool_calls may leave it out)"),
    (_set(("messages", 0, "tool_call_id"), "call_0"), "messages.0.tool_call_id",
     "is not allowed in a user message"),
    (_set(("messages", 0, "tool_calls"), [{"id": "c", "type": "function", "function": {
        "name": "add", "arguments": "{}"}}]), "messages.0.tool_calls",
     "is not allowed in a user message"),
    (_set(("tools", 0, "type"), "custom"), "tools.0.type", ": Input should be 'function'"),
    (_set(("tools", 0, "function", "strict"), True), "tools.0.function.strict",
     ": true is not supported"),
    (_set(("tools", 0, "function", "name"), "a b"), "tools.0.function.name",
     ": String should match pattern"),
]


@pytest.mark.parametrize("change, path, words", BAD)
def test_malformed_tool_use_is_a_400_naming_the_field(server, rng, change, path, words):
    """The message names the field's path; `param` the path, or for a value of the wrong
    form the request's field that holds it (as for any field)."""
    llm, url = server
    tools, messages = tool_chat(rng)
    change(tools, messages)
    reply = httpx.post(f"{url}/v1/chat/completions", timeout=TIMEOUT, json={
        "model": MODEL, "messages": messages, "tools": tools, "max_tokens": 2})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] in (path, path.split(".")[0]), error
    assert error["message"].startswith(path + (" " if words[0] != ":" else "") + words), error
    assert engine_idle(llm)


def test_unanswered_calls_and_forced_tool_choices_are_refused(server, client, rng):
    """OpenAI's rules: every call of an assistant message is answered by the tool messages
    right after it. A tool_choice that forces or forbids a call is refused: the server
    cannot make the model follow it."""
    llm, url = server
    tools, messages = tool_chat(rng)
    calls = messages[1]["tool_calls"]
    unanswered = rng.randrange(len(calls))
    answered = [m for m in messages[:2 + len(calls)]
                if m.get("tool_call_id") != calls[unanswered]["id"]]
    later = [{"role": "assistant", "content": random_text(rng)},
             {"role": "user", "content": random_text(rng)}]
    for conversation in (answered, answered + later):   # the last messages, or not
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=conversation, tools=tools,
                                           max_tokens=2)
        assert caught.value.body["param"] == "messages.1.tool_calls"
        assert f"holds the call {calls[unanswered]['id']!r}, which no tool message answers" \
            in caught.value.body["message"]
    for choice in ("none", "required", {"type": "function", "function": {"name": "add"}}):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=messages, tools=tools,
                                           tool_choice=choice, max_tokens=2)
        assert caught.value.body["param"] == "tool_choice"
        assert 'only "auto" (or null) is supported' in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=messages, tools=tools,
                                       parallel_tool_calls=False, max_tokens=2)
    assert caught.value.body["param"] == "parallel_tool_calls"
    assert "only true (or null) is supported" in caught.value.body["message"]
    assert engine_idle(llm)
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=tools,
                                           parallel_tool_calls=rng.choice([True, None]),
                                           max_tokens=2)
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens
