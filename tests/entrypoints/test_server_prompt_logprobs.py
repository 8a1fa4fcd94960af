"""The server's prompt scoring: completions' `echo` with `logprobs` (OpenAI's legacy
object, as lm-evaluation-harness's loglikelihood requests use it, max_tokens 0 included),
whole and streamed, and the `prompt_logprobs` extension of completions and chat, against
transformers' log-softmax of the same checkpoint; the bound on every logprobs top-n."""

import json

import pytest
import torch

fastapi = pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (test extra) is not installed")

from shardline.entrypoints.logprobs import Decode  # noqa: E402
from server_helpers import MODEL, TIMEOUT, random_text  # noqa: E402

TOLERANCE = 1e-4


def hf_logprobs(hf_tiny_llama, ids: list[int]) -> torch.Tensor:
    """Row i: the log-softmax of transformers' logits predicting token i + 1."""
    with torch.no_grad():
        return hf_tiny_llama(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def post(url: str, path: str, body: dict) -> dict:
    reply = httpx.post(url + path, json=body, timeout=TIMEOUT)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_echo_scores_the_prompt_as_loglikelihood_harnesses_ask(server, hf_tiny_llama, rng):
    """A prompt of token ids (context and continuation), echo, logprobs 1, max_tokens 0 or
    1: the choice leads with the prompt, its tokens' logprobs None first, then
    transformers' log-softmax of each token given those before it."""
    llm, url = server
    decode = Decode(llm.engine.tokenizer)
    ids = [rng.randrange(3, 320) for _ in range(rng.randint(2, 40))]
    max_tokens, top = rng.choice([0, 1, 3]), rng.randint(1, 5)
    body = {"model": MODEL, "prompt": ids, "echo": True, "logprobs": top,
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    (choice,) = post(url, "/v1/completions", body)["choices"]
    logprobs, reference = choice["logprobs"], hf_logprobs(hf_tiny_llama, ids)
    generated = len(logprobs["tokens"]) - len(ids)
    assert generated == max_tokens and choice["finish_reason"] == "length"
    assert logprobs["tokens"][:len(ids)] == [decode(t) for t in ids]
    assert choice["text"].startswith(decode.text(ids))
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    scored = torch.tensor(logprobs["token_logprobs"][1:len(ids)])
    assert torch.allclose(scored, reference[range(len(ids) - 1), ids[1:]], atol=TOLERANCE)
    for i, alternatives in enumerate(logprobs["top_logprobs"][1:len(ids)]):
        # Keyed by text: byte tokens that all read U+FFFD share one key.
        assert 1 <= len(alternatives) <= top + 1
        assert max(alternatives.values()) == pytest.approx(float(reference[i].max()),
                                                           abs=TOLERANCE)
    lengths = [len(t) for t in logprobs["tokens"]]
    assert logprobs["text_offset"] == [sum(lengths[:i]) for i in range(len(lengths))]
    # As lm-evaluation-harness reads it: the continuation's logprobs and whether it is
    # the greedy choice.
    context = rng.randint(1, len(ids) - 1)
    total = sum(logprobs["token_logprobs"][context:len(ids)])
    assert total == pytest.approx(float(reference[range(context - 1, len(ids) - 1),
                                                  ids[context:]].sum()), abs=1e-3)

    streamed = []
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True},
                      timeout=TIMEOUT) as reply:
        streamed = [json.loads(line[6:])["choices"][0] for line in reply.iter_lines()
                    if line.startswith("data: {")]
    assert "".join(c["text"] for c in streamed) == choice["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for c in streamed for v in c["logprobs"][key]] == logprobs[key], key
    assert streamed[-1]["finish_reason"] == "length"


def test_echo_of_a_text_prompt_without_logprobs(server, rng):
    llm, url = server
    prompt = random_text(rng)
    reply = post(url, "/v1/completions", {"model": MODEL, "prompt": [prompt, prompt],
                                          "echo": True, "max_tokens": 0})
    assert [c["text"] for c in reply["choices"]] == [prompt, prompt]
    assert [c["logprobs"] for c in reply["choices"]] == [None, None]
    assert reply["usage"]["completion_tokens"] == 0


def test_prompt_logprobs_extension_on_completions_and_chat(server, hf_tiny_llama, rng):
    llm, url = server
    tokenizer = llm.engine.tokenizer
    top = rng.randint(0, 4)
    prompt = random_text(rng)
    (choice,) = post(url, "/v1/completions", {"model": MODEL, "prompt": prompt,
                                              "max_tokens": 2, "prompt_logprobs": top}
                     )["choices"]
    messages = [{"role": "user", "content": random_text(rng)}]
    chat = post(url, "/v1/chat/completions", {"model": MODEL, "messages": messages,
                                              "max_tokens": 2, "prompt_logprobs": top})
    chat_ids = tokenizer.encode(tokenizer.apply_chat_template(messages, True),
                                add_special_tokens=False)
    for ids, reported in ((tokenizer.encode(prompt), choice["prompt_logprobs"]),
                          (chat_ids, chat["prompt_logprobs"])):
        reference = hf_logprobs(hf_tiny_llama, ids)
        assert len(reported) == len(ids) and reported[0] is None
        for i, entry in enumerate(reported[1:]):
            assert str(ids[i + 1]) in entry and top <= len(entry) <= top + 1
            for token, value in entry.items():
                assert value["logprob"] == pytest.approx(float(reference[i, int(token)]),
                                                         abs=TOLERANCE)
                assert value["decoded_token"] == tokenizer.decode([int(token)],
                                                                  skip_special_tokens=False)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt": "hi", "prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt": "hi", "echo": True, "logprobs": 21}, "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "prompt_logprobs": 21},
     "prompt_logprobs")])
def test_bad_scoring_requests_are_refused_by_name(server, body, param):
    _, url = server
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    reply = httpx.post(url + path, json={"model": MODEL, **body}, timeout=TIMEOUT)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param


@pytest.mark.parametrize("path, field", [
    ("/v1/completions", "logprobs"), ("/v1/completions", "prompt_logprobs"),
    ("/v1/chat/completions", "top_logprobs"), ("/v1/chat/completions", "prompt_logprobs")])
def test_a_top_n_is_bounded_by_the_engines_max_logprobs_and_named_as_sent(
        server, monkeypatch, rng, path, field):
    """Past the engine's max_logprobs, the 400 names the field the client sent (chat's
    top_logprobs was called logprobs) and the bound; the bound is the engine's, not
    OpenAI's 20 (which refused what a server started with --max-logprobs 40 gives), and
    -1 is the vocabulary."""
    llm, url = server
    config, vocab = llm.engine.config.model, llm.engine.vocab_size
    body = {"model": MODEL, "max_tokens": 1, **(
        {"prompt": random_text(rng)} if path == "/v1/completions" else
        {"messages": [{"role": "user", "content": random_text(rng)}], "logprobs": True})}

    def ask(cap, value):
        monkeypatch.setattr(config, "max_logprobs", cap)
        return httpx.post(url + path, json={**body, field: value}, timeout=TIMEOUT)

    cap = rng.randint(1, 10)
    for cap, value, limit in ((cap, rng.randint(cap + 1, 30), cap),
                              (-1, vocab + rng.randint(1, 50), vocab)):
        reply = ask(cap, value)
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["param"] == field and error["message"].startswith(f"{field}={value} ")
        assert f"at most {limit}, " in error["message"]
        assert ("vocabulary" if cap == -1 else "max_logprobs") in error["message"]
    value = rng.randint(21, 40)
    reply = ask(rng.randint(value, 60), value)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    if field == "prompt_logprobs":
        entries = (reply.json() if "message" in choice else choice)["prompt_logprobs"][1]
        assert value <= len(entries) <= value + 1
    elif field == "top_logprobs":
        assert len(choice["logprobs"]["content"][0]["top_logprobs"]) == value
    else:
        assert 0 < len(choice["logprobs"]["top_logprobs"][0]) <= value
