"""Tool use in chat templates: tools, an assistant's tool calls and tool results render as
Hugging Face's renderer renders them, and tool use a template would leave out of the
prompt is refused, naming where it is."""

import json
import re

import pytest

from shardline.engine.chat_template import (UnsupportedByTemplate, check_conversation,
                                            render_chat)

# A template that knows tools, in the manner of the tool-using models' templates: tools
# listed as JSON, calls written as objects, results by the id of their call.
TOOL_TEMPLATE = (
    "{%- if tools %}<|system|>You may call:\n{% for tool in tools %}"
    "{{ tool | tojson(sort_keys=true) }}\n{% endfor %}{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<|tool|>{{ m.tool_call_id }}: {{ m.content | tojson }}\n"
    "{% elif m['tool_calls'] is defined %}<|assistant|>"
    "{{ m.content if m.content is defined else '' }}{% for call in m.tool_calls %}<call>"
    "{{ {'name': call.function.name, 'arguments': call.function.arguments}"
    " | tojson(separators=(',', ':')) }}</call>{% endfor %}\n"
    "{% else %}<|{{ m.role }}|>{{ m.content }}\n{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>{% endif %}")
# One that writes every role as it is (ChatML's manner), and one that writes only some.
PLAIN_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
TWO_ROLES_TEMPLATE = ("{% for m in messages %}{% if m.role == 'user' %}Q: {{ m.content }}\n"
                      "{% elif m.role == 'assistant' %}A: {{ m.content }}\n{% endif %}"
                      "{% endfor %}")
WORDS = ["sky", "Oslo", "Zürich", "東京", "why", "\"quoted\"", "tab\there", "line\nbreak"]


def words(rng, k=4):
    return " ".join(rng.choices(WORDS, k=rng.randint(1, k)))


def random_tools(rng):
    names = rng.sample(["weather", "time_in", "add", "look_up"], rng.randint(1, 3))
    return [{"type": "function", "function": {
        "name": name, "description": words(rng),
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}} for name in names]


def tool_conversation(rng, tools):
    """user, an assistant's tool calls (content None, text or left out), a tool result for
    each call, and maybe the assistant's answer and a user's next question."""
    calls = [{"id": f"call_{rng.randrange(10**6)}_{i}", "type": "function",
              "function": {"name": rng.choice(tools)["function"]["name"],
                           "arguments": {"city": words(rng, 2), "n": rng.randint(-9, 99)}}}
             for i in range(rng.randint(1, 3))]
    assistant = {"role": "assistant", "tool_calls": calls}
    content = rng.choice(["none", "text", "absent"])
    if content != "absent":
        assistant["content"] = None if content == "none" else words(rng)
    messages = [{"role": "user", "content": words(rng)}, assistant]
    messages += [{"role": "tool", "tool_call_id": call["id"],
                  "content": json.dumps({"result": words(rng)}, ensure_ascii=False)}
                 for call in calls]
    if rng.random() < 0.5:
        messages += [{"role": "assistant", "content": words(rng)},
                     {"role": "user", "content": words(rng)}]
    return messages


def transformers_render(template, messages, tools, add_generation_prompt):
    """The prompt transformers' apply_chat_template gives for the same conversation."""
    transformers = pytest.importorskip("transformers")
    from shardline.presets import resolve_model

    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=f"{resolve_model('tiny-llama')}/tokenizer.json")
    return tokenizer.apply_chat_template(messages, tools=tools, chat_template=template,
                                         tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def test_tool_calls_and_results_render_as_transformers_renders_them(rng):
    """The template read `tools` as undefined (no tools variable), rendering failed on an
    assistant's content None, and tojson took no separators or sort_keys."""
    tools = random_tools(rng)
    messages = tool_conversation(rng, tools)
    generation_prompt = rng.random() < 0.5
    for given in (tools, None):
        expected = transformers_render(TOOL_TEMPLATE, messages, given, generation_prompt)
        assert render_chat(TOOL_TEMPLATE, messages, generation_prompt, tools=given) == expected
    rendered = render_chat(TOOL_TEMPLATE, messages, generation_prompt, tools=tools)
    for call in messages[1]["tool_calls"]:
        assert json.dumps(call["function"]["arguments"], separators=(",", ":"),
                          ensure_ascii=False) in rendered


def test_tool_use_a_template_would_drop_is_refused_naming_it(rng):
    """A template that never reads tools or tool_calls, or leaves tool results out, made a
    prompt without them: the model answered another conversation than the one given."""
    tools = random_tools(rng)
    messages = tool_conversation(rng, tools)
    plain = [m for m in messages if "tool_calls" not in m]
    with pytest.raises(UnsupportedByTemplate, match=re.escape(
            "tools: the chat template never reads `tools`")) as refused:
        render_chat(PLAIN_TEMPLATE, plain, tools=tools)
    assert refused.value.param == "tools"
    with pytest.raises(UnsupportedByTemplate, match=re.escape(
            "messages[1].tool_calls: the chat template never reads a message's "
            "tool_calls")) as refused:
        render_chat(PLAIN_TEMPLATE, messages)
    assert refused.value.param == "messages.1.tool_calls"
    with pytest.raises(UnsupportedByTemplate, match=re.escape(
            "messages[1] is a tool result (role 'tool'), which the chat template leaves "
            "out")) as refused:
        render_chat(TWO_ROLES_TEMPLATE, plain)
    assert refused.value.param == "messages.1"
    # No tools lose none: tools=[] was refused ("would not see the 0 given").
    assert render_chat(PLAIN_TEMPLATE, plain, tools=[]) == render_chat(PLAIN_TEMPLATE, plain)
    # A template that writes every role as it is writes the results too.
    assert render_chat(PLAIN_TEMPLATE, plain) == "".join(
        f"<|{m['role']}|>{m['content']}\n" for m in plain)


@pytest.mark.parametrize("message, error", [
    ({"role": "assistant", "content": None}, r"messages\[1\]=.* is not a message"),
    ({"role": "assistant", "tool_calls": []}, r"messages\[1\]=.* is not a message"),
    ({"role": "tool", "content": None, "tool_call_id": "c"}, r"messages\[1\]=.* is not a"),
    ({"role": "user", "content": "hi", "tool_calls": [{"id": "c"}]},
     r"messages\[1\]\.tool_calls=.* is invalid: only an assistant message makes tool calls"),
    ({"role": "assistant", "content": "hi", "tool_calls": ["c"]},
     r"messages\[1\]\.tool_calls=\['c'\] is invalid"),
])
def test_a_malformed_tool_message_is_refused_by_index(message, error):
    with pytest.raises(ValueError, match=error):
        check_conversation([{"role": "user", "content": "hi"}, message], "messages")


def test_an_empty_list_of_tool_calls_makes_none():
    messages = [{"role": "user", "content": "hi", "tool_calls": []},
                {"role": "assistant", "content": "hello", "tool_calls": []}]
    assert render_chat(PLAIN_TEMPLATE, messages, False) == "<|user|>hi\n<|assistant|>hello\n"


def test_keys_set_to_none_are_left_out_as_transformers_leaves_them(rng):
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": {}}}
    message = {"role": "assistant", "content": None, "tool_calls": [call], "name": None}
    assert check_conversation([message], "messages") == [
        {"role": "assistant", "tool_calls": [call]}]
    template = "{% for m in messages %}{{ m | tojson }}{{ m.tool_calls | length }}{% endfor %}"
    assert render_chat(template, [message], False) == transformers_render(
        template, [message], None, False)


@pytest.mark.parametrize("tools", ["weather", [["weather"]], {"type": "function"}])
def test_tools_that_are_not_a_list_of_definitions_are_refused(tools):
    with pytest.raises(ValueError, match=re.escape("tools=") + ".* is invalid: pass a list"):
        render_chat(TOOL_TEMPLATE, [{"role": "user", "content": "hi"}], tools=tools)


class _Counted(str):
    """A prompt that counts the characters its searches for a substring pass over."""

    def find(self, sub, start=0, *end):
        at = str.find(self, sub, start, *end)
        self.passed = getattr(self, "passed", 0) + (len(self) if at < 0 else at + len(sub))
        self.passed -= start
        return at

    def __contains__(self, sub):
        return self.find(sub) >= 0


def test_tool_results_are_found_in_one_pass_over_the_prompt(rng):
    """Each result's mark was looked for from the prompt's start: n results, n passes (a
    4 MB body of 30,000 one-call results took 17 s). Results a template writes in another
    order are still found."""
    from shardline.engine.chat_template import _check_tool_results_kept, _compile

    calls = [{"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": {}}}
             for i in range(rng.randint(20, 200))]
    messages = check_conversation(
        [{"role": "user", "content": words(rng)},
         {"role": "assistant", "tool_calls": calls},
         *({"role": "tool", "tool_call_id": call["id"], "content": words(rng)}
           for call in calls)], "messages")
    template = TOOL_TEMPLATE.replace("in messages %}", "in messages | reverse %}")
    prompts = []
    for compiled in (_compile(TOOL_TEMPLATE), _compile(template)):
        class Counting:
            def render(self, **variables):
                prompts.append(_Counted(compiled.render(**variables)))
                return prompts[-1]

        _check_tool_results_kept(Counting(), messages, {"tools": None,
                                                        "add_generation_prompt": True})
    in_order, reversed_order = prompts
    assert in_order.passed <= len(in_order)
    assert reversed_order.passed > len(reversed_order)   # found, if slowly
