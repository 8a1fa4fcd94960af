"""Rendering a conversation into a prompt with a model's chat template (Jinja2).

Chat templates are Jinja2 programs written for Hugging Face's renderer: blocks trimmed
(`trim_blocks`, `lstrip_blocks`), `{% break %}` and `{% continue %}` in loops, a
`{% generation %}` block (which marks the assistant's text for training; here it renders its
body), the functions `raise_exception` and `strftime_now` (today's date, which Llama 3.x
templates write), a `tojson` filter that keeps non-ASCII text, and the variables
`messages`, `add_generation_prompt`, `bos_token` and `eos_token`. They run sandboxed,
since a template comes with the checkpoint.

A message's role must be one templates are written for (`ROLES`); a template writes an
unknown one into the prompt as is (ChatML's `<|im_start|>robot`), a turn the model never
learned, so a misspelt role would go unnoticed. "developer", OpenAI's newer name for the
system role, is rendered as "system".
"""

from __future__ import annotations

import datetime
import functools
import json
import reprlib
from typing import Mapping, Sequence

Message = Mapping[str, str]

# "tool" carries a tool's answer, which the templates of tool-using models (Llama 3.1,
# Qwen2.5) render; the others write it as they write any turn.
ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}


def check_conversation(conversation: object, where: str) -> list[Message]:
    """`conversation` as a list of messages, each a dict with a str "role" (one of ROLES,
    aliases replaced) and "content", or a ValueError naming the first bad one."""
    if not isinstance(conversation, Sequence) or isinstance(conversation, (str, bytes)):
        raise ValueError(f"{where}={reprlib.repr(conversation)} is not a conversation: pass a "
                         'list of {"role": ..., "content": ...} dicts')
    if not conversation:
        raise ValueError(f"{where} is empty: a conversation needs at least one message")
    checked = []
    for i, message in enumerate(conversation):
        if not (isinstance(message, Mapping) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ValueError(f"{where}[{i}]={reprlib.repr(message)} is not a message: pass a "
                             'dict with str "role" and "content"')
        role = ROLE_ALIASES.get(message["role"], message["role"])
        if role not in ROLES:
            raise ValueError(f"{where}[{i}] has role={message['role']!r}, which chat templates "
                             f"do not know: use one of {', '.join(ROLES)} (or developer, "
                             "OpenAI's name for system)")
        checked.append(message if role == message["role"] else {**message, "role": role})
    return checked


class TemplateRefusal(ValueError):
    """The template's raise_exception: it refuses the conversation, on purpose."""


def _generation_block():
    """The Jinja2 extension of `{% generation %}...{% endgeneration %}`: its body alone."""
    from jinja2.ext import Extension

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return GenerationBlock


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateRefusal(f"the chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols", _generation_block()])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.datetime.now().strftime(format)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False,
                                                                  indent=indent)
    return env.from_string(template)


def render_chat(template: str, messages: list[Message], add_generation_prompt: bool = True,
                source: str | None = None, **variables: object) -> str:
    """The prompt text of `messages` under `template` (checked by `check_conversation`);
    `variables` (bos_token, eos_token, ...) are passed to the template as well. A template
    that does not compile, or fails on this conversation, is a ValueError naming `source`,
    the file it came from: the model still serves plain prompts."""
    from jinja2 import TemplateSyntaxError

    where = f"{source}: " if source else ""
    messages = check_conversation(messages, "messages")
    try:
        compiled = _compile(template)
    except TemplateSyntaxError as exc:
        raise ValueError(f"{where}the chat template does not compile: {exc.message} (line "
                         f"{exc.lineno} of the template): expected a Jinja2 template as Hugging "
                         "Face's renderer takes it") from None
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               **variables)
    except TemplateRefusal:
        raise
    except Exception as exc:   # the template is the checkpoint's code: any error is its own
        raise ValueError(f"{where}the chat template failed on this conversation: "
                         f"{type(exc).__name__}: {exc}") from None
