"""LLM.chat on a preset given a chat template: conversations rendered and tokenized as the
template writes them, outputs in order, bad conversations refused by index; special
tokens left out of the output text unless skip_special_tokens=False."""

import datetime
import os
import random
import re

import pytest

from near_ties import assert_greedy_match, outputs_run
from shardline import LLM, SamplingParams
from shardline.engine.chat_template import ROLES, UnsupportedByTemplate, render_chat
from shardline.engine.detokenizer import IncrementalDetokenizer
from shardline.engine.tokenizer import Tokenizer
from shardline.presets import BOS_ID, byte_tokenizer

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)


def conversation(rng: random.Random) -> list[dict]:
    words = ["sky", "blue", "why", "is", "the", "sea", "green", "hello"]
    turns = [{"role": role, "content": " ".join(rng.choices(words, k=rng.randint(1, 5)))}
             for role in ("user", "assistant", "user")[:rng.choice((1, 3))]]
    return turns


@pytest.fixture(scope="module")
def llm():
    engine = LLM("tiny-llama", block_size=4, num_kv_blocks=128)
    engine.engine.tokenizer.chat_template = TEMPLATE
    yield engine
    engine.shutdown()


def test_chat_renders_each_conversation_and_answers_in_order(llm, rng):
    conversations = [conversation(rng) for _ in range(3)]
    outputs = llm.chat(conversations, GREEDY)
    tokenizer = llm.engine.tokenizer
    texts = [render_chat(TEMPLATE, c) for c in conversations]
    assert [o.prompt for o in outputs] == texts
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    assert [list(o.prompt_token_ids) for o in outputs] == ids
    assert all(o.prompt_token_ids[0] == BOS_ID for o in outputs)  # "<s>" is the BOS token
    # These runs find the prompts in the prefix cache, so their arithmetic differs a little.
    expected = llm.generate(ids, GREEDY)
    assert_greedy_match(outputs_run(expected), outputs_run(outputs))
    single, = llm.chat(conversations[0], GREEDY)
    assert_greedy_match(outputs_run(outputs[:1]), outputs_run([single]))


def test_generation_prompt_is_optional(llm):
    messages = [{"role": "user", "content": "hi"}]
    assert llm.chat(messages, GREEDY)[0].prompt.endswith("assistant:")
    assert llm.chat(messages, GREEDY, add_generation_prompt=False)[0].prompt == "<s>user: hi\n"


@pytest.mark.parametrize("messages, error", [
    ([], "messages is empty"),
    ("hello", "messages='hello' is not a conversation"),
    ([{"role": "user"}], r"messages\[0\]=.* is not a message"),
    ([[{"role": "user", "content": "a"}], [{"role": "user", "content": 3}]],
     r"messages\[1\]\[0\]=.* is not a message"),
])
def test_bad_conversation_is_refused_by_index(llm, messages, error):
    with pytest.raises(ValueError, match=error):
        llm.chat(messages, GREEDY)
    assert not llm.has_unfinished_requests()


def tool_turns(rng: random.Random, names: list[str]) -> list[dict]:
    """A question, the assistant's calls of some of the tools `names`, and their results:
    short, as the byte tokenizer spends a token per byte of max_model_len's 512."""
    calls = [{"id": f"call_{i}", "type": "function",
              "function": {"name": name, "arguments": {"city": rng.choice(["Oslo", "Lima"])}}}
             for i, name in enumerate(rng.sample(names, rng.randint(1, len(names))))]
    return ([{"role": "user", "content": conversation(rng)[0]["content"]},
             {"role": "assistant", "content": None, "tool_calls": calls}]
            + [{"role": "tool", "tool_call_id": call["id"], "content": str(rng.randint(0, 99))}
               for call in calls])


def test_chat_gives_tools_to_a_template_that_reads_them(llm, rng, monkeypatch):
    from test_chat_template_tools import TOOL_TEMPLATE
    names = rng.sample(["weather", "time_in", "add", "look_up"], 2)
    tools = [{"type": "function", "function": {"name": name}} for name in names]
    conversations = [tool_turns(rng, names) for _ in range(2)]
    with pytest.raises(UnsupportedByTemplate, match="never reads `tools`"):
        llm.chat(conversations[0], GREEDY, tools=tools)
    monkeypatch.setattr(llm.engine.tokenizer, "chat_template", TOOL_TEMPLATE)
    outputs = llm.chat(conversations, GREEDY, tools=tools)
    for output, turns in zip(outputs, conversations):
        assert output.prompt == render_chat(TOOL_TEMPLATE, turns, tools=tools)
        assert all(f'"name": "{name}"' in output.prompt for name in names)
        assert len(output.outputs[0].token_ids) == GREEDY.max_tokens


def test_model_without_chat_template_is_refused(llm, monkeypatch):
    monkeypatch.setattr(llm.engine.tokenizer, "chat_template", None)
    with pytest.raises(ValueError, match="no chat template"):
        llm.chat([{"role": "user", "content": "hi"}])


def test_template_exceptions_and_json():
    template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}"
                "{% endif %}{{ messages | tojson }}")
    with pytest.raises(ValueError, match="refused the conversation: user first"):
        render_chat(template, [{"role": "system", "content": "x"}])
    assert render_chat(template, [{"role": "user", "content": "é漢"}]) == \
        '[{"role": "user", "content": "é漢"}]'


@pytest.fixture(scope="module")
def broken_template_model(tmp_path_factory):
    """tiny-llama whose chat_template.jinja is written by each test."""
    from shardline.presets import resolve_model

    source = resolve_model("tiny-llama")
    target = tmp_path_factory.mktemp("broken-template")
    for name in os.listdir(source):
        os.symlink(os.path.join(source, name), target / name)
    return target


def test_a_template_that_does_not_compile_or_render_names_its_file(broken_template_model,
                                                                    rng):
    """A syntax error raised jinja2's bare TemplateSyntaxError, a failing template its bare
    UndefinedError or ZeroDivisionError (a 500 from the server), naming no file. Each is a
    ValueError naming the file, and the model keeps serving plain prompts."""
    lines = rng.randint(0, 4)
    turns = conversation(rng)
    path = broken_template_model / "chat_template.jinja"
    path.write_text("{{ messages[0].content }}\n" * lines + "{% for %}")
    with LLM(str(broken_template_model), device="cpu", num_kv_blocks=32) as llm:
        with pytest.raises(ValueError, match=re.escape(
                f"{path}: the chat template does not compile: Expected an expression, got "
                f"'end of statement block' (line {lines + 1} of the template)")):
            llm.chat(turns, GREEDY)
        assert len(llm.generate([[BOS_ID, 5]], GREEDY)[0].outputs[0].token_ids) == 6
    for template, error in [(f"{{{{ messages[{len(turns)}].content }}}}",
                             f"UndefinedError: list object has no element {len(turns)}"),
                            ("{{ 1 / (messages | length - %d) }}" % len(turns),
                             "ZeroDivisionError: division by zero")]:
        path.write_text(template)
        with pytest.raises(ValueError, match=re.escape(
                f"{path}: the chat template failed on this conversation: {error}")):
            Tokenizer.from_model_dir(str(broken_template_model)).apply_chat_template(turns)


def test_constructs_of_hugging_faces_renderer_render(rng):
    """{% break %} and {% continue %} (jinja2's loopcontrols), {% generation %} blocks and
    strftime_now, which Hugging Face's renderer provides, did not compile ("Encountered
    unknown tag 'break'") or failed ("'strftime_now' is undefined")."""
    roles = rng.choices(["user", "assistant"], k=rng.randint(2, 6))
    turns = [{"role": role, "content": f"t{i}"} for i, role in enumerate(roles)]
    stop = rng.randint(1, len(turns))
    template = ("{% for m in messages %}{% if loop.index > " + str(stop) + " %}{% break %}"
                "{% endif %}{% if m.role == 'assistant' %}{% continue %}{% endif %}"
                "{% generation %}{{ m.content }};{% endgeneration %}{% endfor %}"
                "{{ strftime_now('%Y') }}")
    years = {str(datetime.date.today().year)}
    rendered = render_chat(template, turns)
    years.add(str(datetime.date.today().year))
    kept = "".join(f"{m['content']};" for m in turns[:stop] if m["role"] == "user")
    assert rendered in {kept + year for year in years}


def test_special_tokens_are_skipped_in_text_by_default():
    tokenizer = Tokenizer(byte_tokenizer())
    ids = tokenizer.encode("ab") + [BOS_ID] + tokenizer.encode("c")
    texts = {}
    for skip in (True, False):
        detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("hi"), skip)
        texts[skip] = "".join(detokenizer.append(t) for t in ids) + detokenizer.flush()
    assert texts == {True: "abc", False: "ab<s>c"}
    assert SamplingParams().skip_special_tokens is True
    with pytest.raises(ValueError, match="skip_special_tokens"):
        SamplingParams(skip_special_tokens="no")


BAD_ROLES = ("sytem", "robot", "User", "ipython", "", "function")


def test_unknown_role_is_refused_by_index_and_the_engine_keeps_serving(llm, rng):
    conversations = [conversation(rng) for _ in range(3)]
    which = rng.randrange(len(conversations))
    index = rng.randrange(len(conversations[which]))
    role = rng.choice(BAD_ROLES)
    conversations[which][index] = {"role": role, "content": "hi"}
    expected = (f"messages[{which}][{index}] has role={role!r}, which chat templates do not "
                "know: use one of system, user, assistant, tool")
    with pytest.raises(ValueError, match=re.escape(expected)):
        llm.chat(conversations, GREEDY)
    assert not llm.has_unfinished_requests()
    with pytest.raises(ValueError, match=re.escape(f"messages[0] has role={role!r}")):
        render_chat(TEMPLATE, [{"role": role, "content": "hi"}])
    good = conversation(rng)
    assert llm.chat(good, GREEDY)[0].prompt == render_chat(TEMPLATE, good)


@pytest.mark.parametrize("role, rendered", [(r, r) for r in ROLES] + [("developer", "system")])
def test_each_known_role_renders(role, rendered, rng):
    content = " ".join(rng.choices(["a", "b", "c"], k=rng.randint(1, 4)))
    assert render_chat(TEMPLATE, [{"role": role, "content": content}], False) == \
        f"<s>{rendered}: {content}\n"


def test_server_answers_an_unknown_role_with_400_naming_messages(tiny_chat_model):
    """Through /v1/chat/completions a bad role is the client's error (400, param naming
    messages), never a 500; developer is accepted as system."""
    testclient = pytest.importorskip("fastapi.testclient", reason="the serve extra")
    from shardline.engine.async_llm import AsyncLLM
    from shardline.entrypoints.app import build_app

    llm = AsyncLLM(tiny_chat_model, block_size=4, num_kv_blocks=64, max_model_len=128)
    try:
        with testclient.TestClient(build_app(llm, "tiny-chat")) as http:
            for role in BAD_ROLES:
                reply = http.post("/v1/chat/completions", json={
                    "model": "tiny-chat", "max_tokens": 2,
                    "messages": [{"role": "user", "content": "hi"},
                                 {"role": role, "content": "there"}]})
                assert reply.status_code == 400, (role, reply.text)
                assert reply.json()["error"]["param"].startswith("messages"), reply.text
            turns = [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": "hi"}]
            reply = http.post("/v1/chat/completions", json={
                "model": "tiny-chat", "max_tokens": 2, "messages": turns})
            assert reply.status_code == 200, reply.text
            tokenizer = llm.engine.tokenizer
            as_system = tokenizer.apply_chat_template([{**turns[0], "role": "system"},
                                                       turns[1]])
            assert reply.json()["usage"]["prompt_tokens"] == len(
                tokenizer.encode(as_system, add_special_tokens=False))
    finally:
        llm.shutdown()
