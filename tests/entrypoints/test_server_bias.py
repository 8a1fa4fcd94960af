"""logit_bias (OpenAI's field: token ids as strings of digits to biases) and the
allowed_token_ids extension on /v1/completions and /v1/chat/completions: the server
answers what the engine gives for the same SamplingParams, and a bad key, value or id is
a 400 naming the field."""

import pytest

openai = pytest.importorskip("openai", reason="the openai client (test extra) is not installed")
pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")

from shardline.entrypoints.chat_protocol import ChatCompletionRequest  # noqa: E402
from shardline.entrypoints.protocol import CompletionRequest, RequestError, parse  # noqa: E402
from shardline.sampling_params import SamplingParams  # noqa: E402
from server_helpers import MODEL, direct, engine_idle, random_text  # noqa: E402


def _forced_and_free(llm, prompt, rng) -> tuple[int, str]:
    """A token id other than the one the model picks first on its own, and the text the
    engine gives with +100 on it (that token, max_tokens times)."""
    vocab = llm.engine.vocab_size
    free = direct(llm, prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    token = rng.choice([t for t in range(3, vocab) if t != free.outputs[0].token_ids[0]])
    forced = direct(llm, prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                logit_bias={token: 100.0}))
    assert list(forced.outputs[0].token_ids) == [token] * 4
    return token, forced.outputs[0].text


def test_completion_and_chat_take_logit_bias_keyed_by_strings(server, client, rng):
    llm, _ = server
    prompt = random_text(rng)
    token, text = _forced_and_free(llm, prompt, rng)
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                      logit_bias={str(token): 100},
                                      extra_body={"ignore_eos": True})
    assert reply.choices[0].text == text
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4,
                                         temperature=0, logit_bias={str(token): 100},
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == text
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=4,
        temperature=0.9, seed=rng.randrange(2**31), logit_bias={str(token): 100},
        logprobs=True, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == text   # the forced tokens, whatever the prompt
    # The logprobs report the biased distribution: the forced token is all but certain.
    assert all(entry.logprob > -1e-3 for entry in chat.choices[0].logprobs.content)
    assert engine_idle(llm)


def test_allowed_token_ids_extension(server, client, rng):
    llm, _ = server
    vocab = llm.engine.vocab_size
    prompt = random_text(rng)
    allowed = rng.sample(range(3, vocab), rng.randint(1, 4))
    seed = rng.randrange(2**31)
    expected = direct(llm, prompt, SamplingParams(temperature=1.0, seed=seed, max_tokens=6,
                                                  ignore_eos=True, allowed_token_ids=allowed))
    assert set(expected.outputs[0].token_ids) <= set(allowed)
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=1.0,
                                      seed=seed, extra_body={"ignore_eos": True,
                                                             "allowed_token_ids": allowed})
    assert reply.choices[0].text == expected.outputs[0].text


@pytest.mark.parametrize("field, value, words", [
    ("logit_bias", {"abc": 1}, "is not a token id"),
    ("logit_bias", {"-5": 1}, "is not a token id"),
    ("logit_bias", {"5": 101}, "from -100 to 100"),
    ("logit_bias", {"5": -100.5}, "from -100 to 100"),
    ("logit_bias", {"5": "1"}, "valid number"),
    ("logit_bias", {"99999999999999999999": 1}, "keyed by a token id"),
    ("logit_bias", [5], "valid dictionary"),
    ("logit_bias", {"VOCAB": 1}, "outside the vocabulary"),
    ("allowed_token_ids", [], "non-empty"),
    ("allowed_token_ids", [3, "VOCAB"], "outside the vocabulary"),
    ("allowed_token_ids", [-1], "non-empty list of token ids"),
])
@pytest.mark.parametrize("chat", [False, True])
def test_a_bad_bias_or_allowed_id_is_a_400_naming_the_field(server, client, field, value,
                                                          words, chat):
    llm, _ = server
    vocab = str(llm.engine.vocab_size)
    if isinstance(value, dict):
        value = {vocab if k == "VOCAB" else k: v for k, v in value.items()}
    else:
        value = [int(vocab) if v == "VOCAB" else v for v in value]
    with pytest.raises(openai.BadRequestError) as caught:
        if chat:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                                   "content": "hi"}],
                                           max_tokens=2, extra_body={field: value})
        else:
            client.completions.create(model=MODEL, prompt="hello", max_tokens=2,
                                      extra_body={field: value})
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == field, caught.value.body
    assert field in caught.value.body["message"] and words in caught.value.body["message"]
    assert engine_idle(llm)


def test_an_empty_bias_asks_for_nothing(rng):
    """LangChain's completions model sends `"logit_bias": {}` with every request."""
    body = {"model": "m", "prompt": "hi", "temperature": rng.random()}
    for model, extra in ((CompletionRequest, {}),
                         (ChatCompletionRequest, {"messages": [{"role": "user",
                                                                "content": "x"}]})):
        body = {**body, **extra}
        if model is ChatCompletionRequest:
            body.pop("prompt")
        empty = parse(model, {**body, "logit_bias": {}})
        assert empty == parse(model, body)
        assert empty.to_sampling_params().logit_bias is None


def test_keys_become_ints_for_the_engine(rng):
    bias = {rng.randrange(10**6): rng.uniform(-100, 100) for _ in range(rng.randint(1, 9))}
    parsed = parse(CompletionRequest, {"model": "m", "prompt": "hi",
                                       "logit_bias": {str(k): v for k, v in bias.items()},
                                       "allowed_token_ids": list(bias)})
    params = parsed.to_sampling_params()
    assert params.logit_bias == bias and params.allowed_token_ids == list(bias)
    with pytest.raises(RequestError) as refused:
        parse(CompletionRequest, {"model": "m", "prompt": "hi",
                                  "logit_bias": {" 5": 1.0}}).to_sampling_params()
    assert refused.value.param == "logit_bias"
