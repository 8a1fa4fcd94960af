"""Rendering a conversation into a prompt with a model's chat template (Jinja2).

Chat templates are Jinja2 programs written for Hugging Face's renderer: blocks trimmed
(`trim_blocks`, `lstrip_blocks`), a `raise_exception` function, a `tojson` filter that
keeps non-ASCII text, and the variables `messages`, `add_generation_prompt`, `bos_token`
and `eos_token`. They run sandboxed, since a template comes with the checkpoint.
"""

from __future__ import annotations

import functools
import json
import reprlib
from typing import Mapping, Sequence

Message = Mapping[str, str]


def check_conversation(conversation: object, where: str) -> list[Message]:
    """`conversation` as a list of messages, each a dict with a str "role" and "content",
    or a ValueError naming the first bad one."""
    if not isinstance(conversation, Sequence) or isinstance(conversation, (str, bytes)):
        raise ValueError(f"{where}={reprlib.repr(conversation)} is not a conversation: pass a "
                         'list of {"role": ..., "content": ...} dicts')
    if not conversation:
        raise ValueError(f"{where} is empty: a conversation needs at least one message")
    for i, message in enumerate(conversation):
        if not (isinstance(message, Mapping) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ValueError(f"{where}[{i}]={reprlib.repr(message)} is not a message: pass a "
                             'dict with str "role" and "content"')
    return list(conversation)


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(f"the chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False,
                                                                  indent=indent)
    return env.from_string(template)


def render_chat(template: str, messages: list[Message], add_generation_prompt: bool = True,
                **variables: object) -> str:
    """The prompt text of `messages` under `template`; `variables` (bos_token, eos_token,
    ...) are passed to the template as well."""
    return _compile(template).render(messages=messages,
                                     add_generation_prompt=add_generation_prompt, **variables)
