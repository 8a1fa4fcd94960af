"""Rendering a conversation into a prompt with a model's chat template (Jinja2).

Chat templates are Jinja2 programs written for Hugging Face's renderer: blocks trimmed
(`trim_blocks`, `lstrip_blocks`), `{% break %}` and `{% continue %}` in loops, a
`{% generation %}` block (which marks the assistant's text for training; here it renders its
body), the functions `raise_exception` and `strftime_now` (today's date, which Llama 3.x
templates write), Hugging Face's `tojson` filter (non-ASCII kept; indent, separators and
sort_keys), and the variables `messages`, `tools`, `add_generation_prompt`, `bos_token` and
`eos_token`. They run sandboxed, since a template comes with the checkpoint.

A message's role must be one templates are written for (`ROLES`); a template writes an
unknown one into the prompt as is (ChatML's `<|im_start|>robot`), a turn the model never
learned, so a misspelt role would go unnoticed. "developer", OpenAI's newer name for the
system role, is rendered as "system".

Tool use follows Hugging Face's format: an assistant message may carry `tool_calls` (its
content then None or left out), a "tool" message carries a tool's result, and `tools`
(JSON schemas of the functions) is a template variable. A template that would drop them
is refused rather than followed, since the model would answer a conversation other than
the one given: `tools` or `tool_calls` where the template never reads them, and a tool
message whose content the template leaves out of the prompt (one that writes every role
as it is, as ChatML's do, writes it). As in Hugging Face's renderer, a message's keys set
to None are left out, and `tools` is None when not given.
"""

from __future__ import annotations

import datetime
import functools
import json
import reprlib
import secrets
from typing import Any, Mapping, NamedTuple, Sequence

Message = Mapping[str, Any]

# "tool" carries a tool's answer, which the templates of tool-using models (Llama 3.1,
# Qwen2.5) render; others write it as they write any turn, or leave it out (refused).
ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}


def check_conversation(conversation: object, where: str) -> list[Message]:
    """`conversation` as a list of messages, each a dict with a str "role" (one of ROLES,
    aliases replaced) and "content" (None or left out in an assistant message with
    "tool_calls", a list of dicts; an empty list makes no calls), keys set to None left
    out; or a ValueError naming the first bad one."""
    if not isinstance(conversation, Sequence) or isinstance(conversation, (str, bytes)):
        raise ValueError(f"{where}={reprlib.repr(conversation)} is not a conversation: pass a "
                         'list of {"role": ..., "content": ...} dicts')
    if not conversation:
        raise ValueError(f"{where} is empty: a conversation needs at least one message")
    checked = []
    for i, message in enumerate(conversation):
        if not (isinstance(message, Mapping) and isinstance(message.get("role"), str)
                and (isinstance(message.get("content"), str) or _calls_tools(message))):
            raise ValueError(f"{where}[{i}]={reprlib.repr(message)} is not a message: pass a "
                             'dict with str "role" and "content" (an assistant message with '
                             '"tool_calls" may leave content None)')
        role = ROLE_ALIASES.get(message["role"], message["role"])
        if role not in ROLES:
            raise ValueError(f"{where}[{i}] has role={message['role']!r}, which chat templates "
                             f"do not know: use one of {', '.join(ROLES)} (or developer, "
                             "OpenAI's name for system)")
        calls = message.get("tool_calls")
        if calls not in (None, []) and not _calls_tools(message):
            raise ValueError(f"{where}[{i}].tool_calls={reprlib.repr(calls)} is invalid: only "
                             "an assistant message makes tool calls, a list of dicts such as "
                             '{"type": "function", "function": {"name": ..., "arguments": '
                             "{...}}}")
        checked.append({**{key: value for key, value in message.items() if value is not None},
                        "role": role})
    return checked


def _calls_tools(message: Mapping) -> bool:
    """Whether `message` is an assistant's with tool calls (a non-empty list of dicts)."""
    calls = message.get("tool_calls")
    return (message.get("role") == "assistant" and isinstance(calls, list) and bool(calls)
            and all(isinstance(call, Mapping) for call in calls))


def check_tools(tools: object, where: str) -> list[dict] | None:
    """`tools` as a list of dicts (the tools' JSON schemas, as the template writes them), or
    None; a ValueError naming `where` if it is neither."""
    if tools is None:
        return None
    if (not isinstance(tools, Sequence) or isinstance(tools, (str, bytes))
            or not all(isinstance(tool, Mapping) for tool in tools)):
        raise ValueError(f"{where}={reprlib.repr(tools)} is invalid: pass a list of tool "
                         'definitions, dicts such as {"type": "function", "function": '
                         '{"name": ..., "parameters": {...}}}')
    return [dict(tool) for tool in tools]


class TemplateRefusal(ValueError):
    """The template's raise_exception: it refuses the conversation, on purpose."""


class UnsupportedByTemplate(ValueError):
    """The conversation holds tool use that the template would leave out of the prompt;
    `param` says where, as the server names a request's fields (tools, messages.3)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class _Reads(NamedTuple):
    """What a template reads: the variables it takes from its caller, and the names it
    looks up (attributes, keys) or compares with (string constants: roles)."""

    variables: frozenset[str]
    names: frozenset[str]


def _generation_block():
    """The Jinja2 extension of `{% generation %}...{% endgeneration %}`: its body alone."""
    from jinja2.ext import Extension

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return GenerationBlock


@functools.lru_cache(maxsize=1)
def _environment():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateRefusal(f"the chat template refused the conversation: {message}")

    def tojson(value: object, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        """Hugging Face's tojson: JSON without jinja2's HTML escaping, non-ASCII kept."""
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols", _generation_block()])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.datetime.now().strftime(format)
    env.filters["tojson"] = tojson
    return env


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    return _environment().from_string(template)


@functools.lru_cache(maxsize=8)
def _reads(template: str) -> _Reads:
    """What `template` (one that compiles) reads, from its syntax tree."""
    from jinja2 import meta, nodes

    tree = _environment().parse(template)
    names = {node.attr for node in tree.find_all(nodes.Getattr)}
    names |= {node.value for node in tree.find_all(nodes.Const) if isinstance(node.value, str)}
    return _Reads(frozenset(meta.find_undeclared_variables(tree)), frozenset(names))


def _check_template_reads(template: str, messages: list[Message],
                          tools: list[dict] | None) -> None:
    """Refuse `tools` and tool calls that `template` never reads (it would leave them out);
    an empty list of tools loses none."""
    reads = _reads(template)
    if tools and "tools" not in reads.variables:
        raise UnsupportedByTemplate(
            f"tools: the chat template never reads `tools`, so the model would not see the "
            f"{len(tools)} given: this model's template has no tool support; leave tools out",
            "tools")
    for i, message in enumerate(messages):
        if message.get("tool_calls") and "tool_calls" not in reads.names:
            raise UnsupportedByTemplate(
                f"messages[{i}].tool_calls: the chat template never reads a message's "
                "tool_calls, so it would leave the assistant's tool calls out of the prompt: "
                "this model's template has no tool support", f"messages.{i}.tool_calls")


def _check_tool_results_kept(compiled: Any, messages: list[Message],
                             variables: dict) -> None:
    """Refuse tool messages whose content `compiled` leaves out of the prompt (a template
    that writes only the roles it knows): each is rendered as a random number, and each
    number must be in the prompt (digits survive tojson, trim and case changes). Each is
    looked for after the one before, where templates write it, so that n results cost one
    pass over the prompt, not n (30,000 one-call results, a 4 MB body, took 17 s)."""
    marks = {i: str(secrets.randbits(64)).zfill(20)
             for i, message in enumerate(messages) if message["role"] == "tool"}
    if not marks:
        return
    probe = [{**message, "content": marks[i]} if i in marks else message
             for i, message in enumerate(messages)]
    rendered = compiled.render(messages=probe, **variables)
    after = 0
    for i, mark in marks.items():
        at = rendered.find(mark, after)
        if at < 0:   # written before the previous result, or not at all
            at = rendered.find(mark)
        if at < 0:
            raise UnsupportedByTemplate(
                f"messages[{i}] is a tool result (role 'tool'), which the chat template "
                "leaves out of the prompt: this model's template does not render tool results",
                f"messages.{i}")
        after = at + len(mark)


def render_chat(template: str, messages: list[Message], add_generation_prompt: bool = True,
                source: str | None = None, tools: list[dict] | None = None,
                **variables: object) -> str:
    """The prompt text of `messages` under `template` (checked by `check_conversation`),
    with `tools` (a list of tool definitions, checked by `check_tools`); `variables`
    (bos_token, eos_token, ...) are passed to the template as well. A template that does not
    compile, or fails on this conversation, is a ValueError naming `source`, the file it came
    from: the model still serves plain prompts. Tool use the template would leave out of
    the prompt is an UnsupportedByTemplate naming where it is."""
    from jinja2 import TemplateSyntaxError

    where = f"{source}: " if source else ""
    messages = check_conversation(messages, "messages")
    tools = check_tools(tools, "tools")
    try:
        compiled = _compile(template)
    except TemplateSyntaxError as exc:
        raise ValueError(f"{where}the chat template does not compile: {exc.message} (line "
                         f"{exc.lineno} of the template): expected a Jinja2 template as Hugging "
                         "Face's renderer takes it") from None
    _check_template_reads(template, messages, tools)
    variables = {**variables, "tools": tools, "add_generation_prompt": add_generation_prompt}
    try:
        rendered = compiled.render(messages=messages, **variables)
        _check_tool_results_kept(compiled, messages, variables)
    except (TemplateRefusal, UnsupportedByTemplate):
        raise
    except Exception as exc:   # the template is the checkpoint's code: any error is its own
        raise ValueError(f"{where}the chat template failed on this conversation: "
                         f"{type(exc).__name__}: {exc}") from None
    return rendered
