"""Requests at the edge of the model's context (the server's max_model_len is 512): a
number of tokens asked for that cannot fit is a 400 naming its field, as OpenAI's API
answers; one that just fits is served in full, and a default stops at the context."""

import pytest

openai = pytest.importorskip("openai", reason="the openai client (test extra) is not installed")
pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")

from server_helpers import MODEL, engine_idle  # noqa: E402

CONTEXT = 512
VOCAB = 320  # tiny-llama's byte-level vocabulary


def prompt_ids(rng, length: int) -> list[int]:
    return [rng.randint(5, 100) for _ in range(length)]


def test_max_tokens_past_the_context_is_400_and_one_that_fits_is_served(server, client, rng):
    """max_tokens past the context was cut short silently (finish_reason "length")."""
    length = rng.randint(CONTEXT - 40, CONTEXT - 2)
    prompt = prompt_ids(rng, length)
    room = CONTEXT - length
    asked = room + rng.randint(1, 10**6)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=asked)
    body = caught.value.body
    assert body["param"] == "max_tokens", body
    assert f"prompt has {length} tokens and max_tokens={asked}" in body["message"]
    assert f"at most {room}" in body["message"]
    assert engine_idle(server[0])

    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=room,
                                      extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == room
    assert reply.choices[0].finish_reason == "length"


def test_a_prompt_that_fills_the_context_is_told_no_tokens_fit(client, rng):
    """A prompt of the whole context with max_tokens was told to 'ask for at most 0', which
    max_tokens cannot be."""
    asked = rng.randint(1, 10**6)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=prompt_ids(rng, CONTEXT), max_tokens=asked)
    message = caught.value.body["message"]
    assert message.startswith(f"prompt has {CONTEXT} tokens and max_tokens={asked} asks")
    assert message.endswith("the prompt leaves no room for any: shorten it")
    assert caught.value.body["param"] == "max_tokens"


def test_a_list_of_prompts_names_the_one_that_does_not_fit(client, rng):
    short, long = rng.randint(2, 20), rng.randint(CONTEXT - 20, CONTEXT - 2)
    asked = CONTEXT - long + rng.randint(1, 5)
    assert asked + short <= CONTEXT
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, max_tokens=asked,
                                  prompt=[prompt_ids(rng, short), prompt_ids(rng, long)])
    assert caught.value.body["message"].startswith(f"prompt[1] has {long} tokens")


def test_the_default_max_tokens_stops_at_the_context(client, rng):
    """Completions default to 16 tokens; a prompt with less room than that is served up to
    the context, not refused: the client did not ask for a number."""
    length = rng.randint(CONTEXT - 15, CONTEXT - 1)
    reply = client.completions.create(model=MODEL, prompt=prompt_ids(rng, length),
                                      extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == CONTEXT - length
    assert reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_chat_tokens_past_the_context_are_400_naming_the_field(client, rng, field):
    asked = rng.randint(CONTEXT, 10**6)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       **{field: asked})
    assert caught.value.body["param"] == field
    assert f"{field}={asked}" in caught.value.body["message"]


def test_an_engine_error_about_a_prompt_names_it_once_as_the_request_does(client, rng):
    """The engine's message names the prompt "prompt", and the server put the request's
    name in front: "prompt: prompt has 600 tokens", and for token 3 of prompt 1
    "prompt[1]: prompt[3]=999 is outside the vocabulary". The request's name replaces it."""
    long = rng.randint(CONTEXT + 1, 2 * CONTEXT)
    bad_at, bad = rng.randint(0, 5), rng.randint(VOCAB, 10**6)
    ids = prompt_ids(rng, 6)
    ids[bad_at] = bad
    cases = [(prompt_ids(rng, long), f"prompt has {long} tokens, longer than"),
             ([prompt_ids(rng, 4), prompt_ids(rng, long)], f"prompt[1] has {long} tokens"),
             (ids, f"prompt[{bad_at}]={bad} is outside the vocabulary"),
             ([prompt_ids(rng, 4), ids], f"prompt[1][{bad_at}]={bad} is outside the vocabulary"),
             ([prompt_ids(rng, 4), []], "prompt[1] is empty")]
    for prompt, start in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
        assert caught.value.body["message"].startswith(start), caught.value.body
        assert caught.value.body["param"] == "prompt"


def test_a_conversation_past_the_context_is_named_messages(client, rng):
    words = " ".join("ab" for _ in range(rng.randint(CONTEXT, 2 * CONTEXT)))
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, max_tokens=1,
                                       messages=[{"role": "user", "content": words}])
    assert caught.value.body["message"].startswith("messages has "), caught.value.body
    assert caught.value.body["param"] == "messages"
