"""Request bodies: OpenAI's nullable fields take null, and a union field's error names the
forms it takes."""

import pytest

pytest.importorskip("pydantic", reason="the serve extra (pydantic) is not installed")

from shardline.entrypoints.chat_protocol import ChatCompletionRequest  # noqa: E402
from shardline.entrypoints.protocol import CompletionRequest, RequestError, parse  # noqa: E402

MESSAGES = [{"role": "user", "content": "hi"}]
PROMPT_FORMS = ("prompt: must be a string, a list of strings, a list of token ids (integers) "
                "or a list of lists of token ids")


@pytest.mark.parametrize("request_type, body, nullable", [
    (CompletionRequest, {"prompt": "hi"}, ("n", "stream", "echo", "logprobs")),
    (ChatCompletionRequest, {"messages": MESSAGES}, ("n", "stream", "logprobs"))])
def test_null_is_the_default_where_openai_allows_it(request_type, body, nullable, rng):
    """Each was a 400 ("n: Input should be a valid integer (got None)"), for clients that
    write every field of OpenAI's schema, null where unset."""
    chosen = rng.sample(nullable, rng.randint(1, len(nullable)))
    parsed = parse(request_type, {"model": "m", **body, **dict.fromkeys(chosen)})
    defaults = parse(request_type, {"model": "m", **body})
    assert parsed == defaults
    assert parsed.to_sampling_params() == defaults.to_sampling_params()


def test_a_bad_prompt_names_every_form_a_prompt_takes(rng):
    """pydantic named the union's first member alone: "prompt.str: Input should be a
    valid string", for token ids with a float among them too."""
    ids = [rng.randint(0, 300) for _ in range(rng.randint(1, 5))]
    bad = rng.choice([ids + [rng.random()], [ids, "text"], [[*ids, "x"]], rng.randint(0, 9),
                      None, {"text": "hi"}, [True, *ids]])
    with pytest.raises(RequestError) as refused:
        parse(CompletionRequest, {"model": "m", "prompt": bad})
    assert str(refused.value) == f"{PROMPT_FORMS} (got {bad!r})"
    assert refused.value.param == "prompt"


def test_a_huge_bad_value_is_shown_by_its_start(rng):
    """The whole value was echoed: a 100k-token prompt with one float in it made a 400 of
    the prompt's size."""
    ids = [rng.randint(0, 300) for _ in range(rng.randint(20_000, 100_000))]
    ids[rng.randrange(len(ids))] = rng.random()
    text = "".join(rng.choices("abc ", k=rng.randint(20_000, 100_000)))
    for field, bad in (("prompt", ids), ("n", text), ("stop", {text: ids})):
        with pytest.raises(RequestError) as refused:
            parse(CompletionRequest, {"model": "m", "prompt": "hi", field: bad})
        message = str(refused.value)
        assert refused.value.param == field and len(message) < 1000
        assert f"(got {repr(bad)[:20]}" in message and "..." in message


@pytest.mark.parametrize("content", [
    [{"type": "image_url", "image_url": {"url": "http://x/cat.png"}}], 7,
    [{"type": "text", "text": "hi"}, {"type": "input_audio", "input_audio": {}}]])
def test_a_chat_part_other_than_text_is_named_unsupported(content):
    with pytest.raises(RequestError) as refused:
        parse(ChatCompletionRequest, {"model": "m",
                                      "messages": [{"role": "user", "content": content}]})
    assert str(refused.value).startswith(
        "messages.0.content: must be a string or a list of text parts (type text, with its "
        "text); other parts, such as images, are not supported (got ")


def test_a_bad_stop_names_its_forms(rng):
    bad = rng.choice([rng.randint(0, 99), ["ok", rng.randint(0, 99)], {"s": "x"}])
    with pytest.raises(RequestError) as refused:
        parse(CompletionRequest, {"model": "m", "prompt": "hi", "stop": bad})
    assert str(refused.value) == f"stop: must be a string, a list of strings or null (got {bad!r})"


def test_too_many_stop_strings_are_refused_by_name(rng):
    from shardline.sampling_params import MAX_STOP_STRINGS
    count = rng.randint(MAX_STOP_STRINGS + 1, 4 * MAX_STOP_STRINGS)
    with pytest.raises(RequestError) as refused:
        parse(CompletionRequest, {"model": "m", "prompt": "hi",
                                  "stop": [f"s{i}" for i in range(count)]}).to_sampling_params()
    assert refused.value.param == "stop"
    assert str(refused.value) == (f"stop=<{count} strings> is invalid: must be a list of at "
                                  f"most {MAX_STOP_STRINGS} strings")


OPENAI_ONLY = ("tools", "tool_choice", "response_format", "parallel_tool_calls",
               "functions", "function_call", "metadata", "store", "service_tier")
MESSAGE_EXTRAS = ("refusal", "tool_calls", "function_call", "audio", "annotations")
NOT_IN_A_MESSAGE = ("refusal", "function_call", "audio", "annotations")


def test_a_field_the_server_does_not_take_set_to_null_is_dropped(rng):
    """A null asks for nothing, but it was refused like a value: `"tools": null` from
    clients that write every field of OpenAI's schema, and `"refusal": null` in each
    assistant message of a history built from the openai client's `message.model_dump()`."""
    top = rng.sample(OPENAI_ONLY, rng.randint(1, len(OPENAI_ONLY)))
    in_message = rng.sample(MESSAGE_EXTRAS, rng.randint(1, len(MESSAGE_EXTRAS)))
    reply = {"role": "assistant", "content": "hello", **dict.fromkeys(in_message)}
    history = [*MESSAGES, reply, {"role": "user", "content": "more"}]
    parsed = parse(ChatCompletionRequest, {"model": "m", "messages": history,
                                           **dict.fromkeys(top)})
    clean = [*MESSAGES, {"role": "assistant", "content": "hello"}, history[-1]]
    assert parsed == parse(ChatCompletionRequest, {"model": "m", "messages": clean})
    field = rng.choice(OPENAI_ONLY)
    assert (parse(CompletionRequest, {"model": "m", "prompt": "hi", field: None})
            == parse(CompletionRequest, {"model": "m", "prompt": "hi"}))


def test_a_field_an_inner_object_does_not_take_is_answered_with_the_fields_it_does(rng):
    """The refusal listed the request's fields (add_generation_prompt, ..., user) for a
    field of a message or of stream_options, which take none of them."""
    field = rng.choice(NOT_IN_A_MESSAGE)
    message = {"role": "assistant", "content": "hi", field: rng.choice(["x", [0], {"a": 1}])}
    with pytest.raises(RequestError) as refused:
        parse(ChatCompletionRequest, {"model": "m", "messages": [*MESSAGES, message]})
    assert str(refused.value) == (f"messages.1.{field} is not supported by this server; it "
                                  "accepts content, name, role, tool_call_id, tool_calls")
    with pytest.raises(RequestError) as refused:
        parse(CompletionRequest, {"model": "m", "prompt": "hi", "stream": True,
                                  "stream_options": {"include_usage": True, field: 1}})
    assert str(refused.value).endswith("it accepts include_usage")
    with pytest.raises(RequestError) as refused:  # a value, not null, is still refused
        parse(CompletionRequest, {"model": "m", "prompt": "hi", field: "x"})
    assert refused.value.param == field


def test_a_body_that_is_not_an_object_is_named_as_json_names_it(rng):
    """The refusal named Python's types: "the body is NoneType" for `null`, "list" for an
    array, "str", "int", "bool"."""
    body, kind = rng.choice([(None, "null"), (rng.random() < 0.5, "a boolean"),
                             (rng.randint(-9, 9), "a number"), (rng.random(), "a number"),
                             (random_text_of(rng), "a string"), ([rng.randint(0, 9)], "an array")])
    with pytest.raises(RequestError) as refused:
        parse(CompletionRequest, body)
    assert str(refused.value) == f"the body is {kind}, not a JSON object"
    assert refused.value.param is None


def random_text_of(rng):
    return "".join(rng.choice("abc {}") for _ in range(rng.randint(0, 9)))


def test_min_tokens_is_taken_and_refused_by_name(rng):
    """min_tokens reaches SamplingParams; above max_tokens (or max_completion_tokens), below
    0 or not an integer it is a RequestError naming it."""
    max_tokens = rng.randint(1, 50)
    chat = {"messages": MESSAGES, rng.choice(["max_tokens", "max_completion_tokens"]): max_tokens}
    for request_type, body in ((CompletionRequest, {"prompt": "hi", "max_tokens": max_tokens}),
                               (ChatCompletionRequest, chat)):
        wanted = rng.randint(0, max_tokens)
        parsed = parse(request_type, {"model": "m", **body, "min_tokens": wanted})
        assert parsed.to_sampling_params().min_tokens == wanted
        for bad in (max_tokens + rng.randint(1, 9), -rng.randint(1, 9)):
            with pytest.raises(RequestError) as refused:
                parse(request_type, {"model": "m", **body, "min_tokens": bad}
                      ).to_sampling_params()
            assert refused.value.param == "min_tokens"
            assert f"min_tokens={bad} is invalid" in str(refused.value)
        for bad in (True, 2.0, "3"):
            with pytest.raises(RequestError) as refused:
                parse(request_type, {"model": "m", **body, "min_tokens": bad})
            assert refused.value.param == "min_tokens"


def test_min_tokens_with_an_echo_alone_is_refused_against_max_tokens_0(rng):
    """echo with max_tokens 0 generates nothing, so min_tokens must be 0 there. The engine
    is asked for one hidden token, and min_tokens 1 was taken while above 1 the refusal
    named max_tokens=1, which the client never sent."""
    body = {"model": "m", "prompt": "hi", "echo": True, "max_tokens": 0}
    assert parse(CompletionRequest, {**body, "min_tokens": 0}).to_sampling_params().min_tokens == 0
    bad = rng.randint(1, 50)
    with pytest.raises(RequestError) as refused:
        parse(CompletionRequest, {**body, "min_tokens": bad}).to_sampling_params()
    assert refused.value.param == "min_tokens"
    assert f"min_tokens={bad} is invalid" in str(refused.value)
    assert "max_tokens=0" in str(refused.value)


def test_a_bad_sampling_value_is_named_as_the_client_sent_it(rng):
    """SamplingParams' refusals reached the client as they are: prefixed with the class
    ("SamplingParams.top_p=2.0 is invalid"), and chat's max_completion_tokens called
    max_tokens in the message ("SamplingParams.max_tokens=0", and "from 0 to
    max_tokens=3" for its min_tokens)."""
    field, bad = rng.choice([("temperature", -rng.uniform(0.1, 5)),
                             ("top_p", rng.uniform(1.1, 5)),
                             ("presence_penalty", rng.uniform(2.1, 9)),
                             ("max_tokens", -rng.randint(1, 9))])
    with pytest.raises(RequestError) as refused:
        parse(CompletionRequest, {"model": "m", "prompt": "hi", field: bad}).to_sampling_params()
    assert str(refused.value).startswith(f"{field}={bad} is invalid: ")
    assert refused.value.param == field
    limit = rng.randint(1, 50)
    for body, named in (({"max_completion_tokens": -rng.randint(0, 9)}, "max_completion_tokens"),
                        ({"max_completion_tokens": limit, "min_tokens": limit + 1},
                         "min_tokens")):
        with pytest.raises(RequestError) as refused:
            parse(ChatCompletionRequest, {"model": "m", "messages": MESSAGES, **body}
                  ).to_sampling_params()
        assert refused.value.param == named
        assert str(refused.value).startswith(f"{named}={body[named]} is invalid: ")
        assert "max_tokens" not in str(refused.value).replace("max_completion_tokens", "")


def test_n_is_refused_with_the_servers_bound(rng):
    """n below 1 was refused as 'must be an integer from 1 to 4096', SamplingParams' bound,
    while the server takes at most 128."""
    from shardline.entrypoints.protocol import MAX_N

    for bad in (-rng.randint(0, 9), rng.randint(MAX_N + 1, 10 * MAX_N)):
        with pytest.raises(RequestError) as refused:
            parse(CompletionRequest, {"model": "m", "prompt": "hi", "n": bad}
                  ).to_sampling_params()
        assert str(refused.value) == f"n: must be an integer from 1 to {MAX_N} (got {bad})"
        assert refused.value.param == "n"


def test_a_field_the_server_does_not_take_left_empty_is_dropped(rng):
    """An empty object or array asks for nothing, as null does, but was refused: LangChain's
    completions model (langchain_openai.OpenAI) sends `"logit_bias": {}` with every
    request, so none of its requests was served."""
    langchain = {"model": "m", "prompt": "hi", "temperature": 0.7, "top_p": 1,
                 "frequency_penalty": 0, "presence_penalty": 0, "n": 1, "seed": None,
                 "logprobs": None, "max_tokens": 256}
    assert (parse(CompletionRequest, {**langchain, "logit_bias": {}})
            == parse(CompletionRequest, langchain))
    fields = rng.sample(OPENAI_ONLY, rng.randint(1, len(OPENAI_ONLY)))
    empty = {field: rng.choice([{}, []]) for field in fields}
    body = {"model": "m", "messages": MESSAGES}
    assert parse(ChatCompletionRequest, {**body, **empty}) == parse(ChatCompletionRequest, body)
    field = rng.choice(OPENAI_ONLY)
    with pytest.raises(RequestError) as refused:  # something asked for is still refused
        parse(ChatCompletionRequest, {**body, field: rng.choice([{"5": 1}, [{}], [0]])})
    assert refused.value.param.split(".")[0] == field


def test_tool_choice_none_without_tools_is_taken(rng):
    """It asks for what a request without tools gets anyway (OpenAI's default there), and
    was a 400 saying that the server cannot forbid a tool call; with tools it still is."""
    messages = [{"role": "user", "content": random_text_of(rng)}]
    no_tools = rng.choice([{}, {"tools": None}, {"tools": []}])
    parsed = parse(ChatCompletionRequest, {"model": "m", "messages": messages,
                                           "tool_choice": "none", **no_tools})
    assert parsed.tool_definitions() is None
    assert parsed.conversation() == messages
    tools = [{"type": "function", "function": {"name": rng.choice(["add", "look_up"])}}]
    with pytest.raises(RequestError) as refused:
        parse(ChatCompletionRequest, {"model": "m", "messages": messages, "tools": tools,
                                      "tool_choice": "none"})
    assert refused.value.param == "tool_choice"
    assert 'only "auto" (or null) is supported' in str(refused.value)
