"""The body of POST /v1/chat/completions: its messages, tool use included, and how they
are given to the chat template.

Chat takes tool use as OpenAI's API writes it (tool definitions in `tools`, assistant
messages with `tool_calls`, tool messages with the result of each call), checked as
OpenAI checks it: which fields each role takes and needs, and that the tool messages after
an assistant's calls answer each of them. The chat template gets it in Hugging Face's
format, a call's arguments as an object, so they must be the JSON text of one (see
shardline.engine.chat_template, which refuses tool use a template would drop). The
reply is text, in which the model writes a tool call as its template taught it: the server
parses none into `tool_calls`, so `tool_choice` may only be "auto" ("none" too when no
tools are given) and no tool may be strict (constrained to its schema).
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Literal, Union

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from shardline.entrypoints.protocol import RequestError, _Body, _one_of, _SamplingFields
from shardline.sampling_params import SamplingParams


class TextPart(_Body):
    type: Literal["text"]
    text: str


def _empty_is_none(value: Any) -> Any:
    """{} and [] ask for nothing, as null does (see protocol._Body): no tools, no calls."""
    return None if value in ({}, []) else value


def _required(field: str, why: str) -> PydanticCustomError:
    """A message's `field` missing or null: parse names it after the message's place."""
    return PydanticCustomError("field_required", f"is required {why}", {"field": field})


def _not_allowed(field: str, role: str) -> PydanticCustomError:
    return PydanticCustomError("field_not_allowed", f"is not allowed in a {role} message",
                               {"field": field})


class FunctionCall(_Body):
    name: str
    arguments: str

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, arguments: str) -> str:
        """The arguments as the model wrote them, JSON text of an object: templates write
        them as the object (Hugging Face's format), so other text could not be replayed."""
        try:
            decoded = json.loads(arguments)
        except ValueError:
            decoded = None
        except RecursionError:   # Python's decoder recurses once a level: "[[[..." is a 500
            raise PydanticCustomError("arguments", "nests too deeply to decode (past Python's "
                                      "recursion limit, {limit} levels)",
                                      {"limit": sys.getrecursionlimit()}) from None
        if not isinstance(decoded, dict):
            raise PydanticCustomError("arguments", "must be the JSON text of an object, as "
                                      'the model wrote it, such as "{\\"city\\": \\"Oslo\\"}"')
        return arguments


class ToolCall(_Body):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Body):
    """A message of any role; which fields a role takes, and needs, is checked once the
    fields are (a tool message needs tool_call_id, only an assistant's content may be null,
    when it makes tool calls)."""

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Annotated[Union[str, list[TextPart], None],
                       _one_of("a string or a list of text parts (type text, with its text); "
                               "other parts, such as images, are not supported")] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("tool_calls", mode="before")
    @classmethod
    def _no_calls_is_none(cls, calls: Any) -> Any:
        return _empty_is_none(calls)

    @model_validator(mode="after")
    def _fields_of_the_role(self) -> "ChatMessage":
        if self.tool_calls is not None and self.role != "assistant":
            raise _not_allowed("tool_calls", self.role)
        if self.tool_call_id is not None and self.role != "tool":
            raise _not_allowed("tool_call_id", self.role)
        if self.role == "tool" and self.tool_call_id is None:
            raise _required("tool_call_id", "in a tool message: the id of the tool call whose "
                            "result it carries")
        if self.content is None and self.tool_calls is None:
            raise _required("content", "(only an assistant message with tool_calls may leave "
                            "it out)" if self.role == "assistant" else
                            f"in a {self.role} message")
        return self

    def text(self) -> str | None:
        if self.content is None or isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict:
        """The message as chat templates take it (Hugging Face's format): text content,
        `name` when given (templates that know names render them), tool calls with their
        arguments as objects, and a tool result's tool_call_id."""
        message: dict = {"role": self.role, "content": self.text(), "name": self.name,
                         "tool_call_id": self.tool_call_id}
        if self.tool_calls is not None:
            message["tool_calls"] = [
                {"id": call.id, "type": call.type,
                 "function": {"name": call.function.name,
                              "arguments": json.loads(call.function.arguments)}}
                for call in self.tool_calls]
        return {key: value for key, value in message.items() if value is not None}


class FunctionDefinition(_Body):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("strict")
    @classmethod
    def _not_strict(cls, strict: bool | None) -> bool | None:
        if strict:
            raise PydanticCustomError("strict", "true is not supported: this server does not "
                                      "constrain the model's tool calls to their schema; leave "
                                      "strict out or false")
        return strict


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions: `messages` rendered with the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    top_n_fields = ("top_logprobs", "prompt_logprobs")

    @field_validator("tools", "tool_choice", "parallel_tool_calls", mode="before")
    @classmethod
    def _no_tools_is_none(cls, value: Any) -> Any:
        return _empty_is_none(value)

    @field_validator("tool_choice")
    @classmethod
    def _auto(cls, choice: Any, info: ValidationInfo) -> Any:
        """Only the model's own choice; or "none" without tools, which asks for what is
        given anyway (OpenAI's default when there are no tools)."""
        if choice == "none" and "tools" in info.data and info.data["tools"] is None:
            return choice
        if choice not in (None, "auto"):
            raise PydanticCustomError("tool_choice", "only \"auto\" (or null) is supported: "
                                      "this server gives the tools to the chat template and "
                                      "the model chooses, so it can neither force a tool call "
                                      "(\"required\", a named function) nor forbid one "
                                      "(\"none\", taken only without tools)")
        return choice

    @field_validator("parallel_tool_calls")
    @classmethod
    def _parallel_allowed(cls, allowed: bool | None) -> bool | None:
        """True is OpenAI's default, which clients send as is; False would hold the model to
        one call per reply, which the server cannot make it do."""
        if allowed is False:
            raise PydanticCustomError("parallel_tool_calls", "only true (or null) is "
                                      "supported: the model writes its tool calls as text, "
                                      "and the server cannot hold it to one call per reply")
        return allowed

    @model_validator(mode="after")
    def _tool_results_answer_calls(self) -> "ChatCompletionRequest":
        """As OpenAI's API has it: the messages that follow an assistant message with tool
        calls are tool messages, which answer each call; a tool message answers a call."""
        called: dict[str, int] = {}   # the last assistant's tool calls: id -> its index
        answered: set[str] = set()
        for i, message in enumerate(self.messages):
            if message.role == "tool":
                if message.tool_call_id not in called:
                    raise PydanticCustomError(
                        "tool_call_id", "{id} answers no tool call: a tool message follows "
                        "the assistant message whose tool_calls hold its id (with only tool "
                        "messages between)", {"field": f"messages.{i}.tool_call_id",
                                              "id": repr(message.tool_call_id)})
                answered.add(message.tool_call_id)
                continue
            _check_answered(called, answered)
            called = {call.id: i for call in message.tool_calls or ()}
            answered = set()
        _check_answered(called, answered)
        return self

    def conversation(self) -> list[dict]:
        """The messages for the chat template (see ChatMessage.for_template)."""
        return [message.for_template() for message in self.messages]

    def tool_definitions(self) -> list[dict] | None:
        """The tools for the chat template, as the client wrote them (nulls left out)."""
        if self.tools is None:
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    def max_tokens_field(self) -> str | None:
        """The field that asked for a number of tokens, None when neither did (the reply
        then runs to the end of the context)."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return "max_tokens" if self.max_tokens is not None else None

    def to_sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs=true", "top_logprobs")
        max_tokens = (self.max_completion_tokens if self.max_completion_tokens is not None
                      else self.max_tokens)
        return self.sampling_params(max_tokens,
                                    (self.top_logprobs or 0) if self.logprobs else None,
                                    sent_as={"max_tokens": self.max_tokens_field() or
                                             "max_tokens", "logprobs": "top_logprobs"})


def _check_answered(called: dict[str, int], answered: set[str]) -> None:
    """Refuse a tool call (id -> index of its message) that no tool message answered."""
    for call_id, i in called.items():
        if call_id not in answered:
            raise PydanticCustomError(
                "tool_calls", "holds the call {id}, which no tool message answers: an "
                "assistant message with tool_calls is followed by a tool message for each "
                "call (its tool_call_id the call's id)",
                {"field": f"messages.{i}.tool_calls", "id": repr(call_id)})
