"""Request bodies: OpenAI's nullable fields take null, and a union field's error names the
forms it takes."""

import pytest

pytest.importorskip("pydantic", reason="the serve extra (pydantic) is not installed")

from shardline.entrypoints.protocol import (ChatCompletionRequest,  # noqa: E402
                                            CompletionRequest, RequestError, parse)

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
