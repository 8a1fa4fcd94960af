"""The OpenAI request bodies the server accepts, and how they map to SamplingParams.

Bodies are validated with pydantic; a field this server does not know, or knows but does
not support (response_format, functions, ...), is refused rather than ignored, so a
client never gets an answer that silently disregarded what it asked for. Types are
strict: a string, a bool or 5.0 where an integer belongs (`"max_tokens": true` would be
1, `"prompt": [true, 7]` token ids 1 and 7) is refused rather than converted; only an
integer is taken where a number belongs. Every refusal is a RequestError naming the
field, which the server returns as a 400 in OpenAI's error format.
"""

from __future__ import annotations

import re
import reprlib
from typing import Annotated, Any, ClassVar, Union, get_args

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, WrapValidator,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

from shardline.sampling_params import SamplingParams

# OpenAI's limit. The engine makes n sequences at once, so an unbounded n from one small
# body (1e30) would fill the host's memory and stall every other request.
MAX_N = 128
# Completions one request may ask for (prompts x n): each is a sequence built on the event
# loop, about 1.3 KB and 35 us, so a 400 KB body of 100,000 prompts at n=128 would take
# 17 GB and stall every other request for minutes.
MAX_COMPLETIONS = 4096


class RequestError(ValueError):
    """A bad request: `param` names the field (None when the body as a whole is bad)."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


def error_body(message: str, param: str | None, kind: str = "invalid_request_error") -> dict:
    """An error response in OpenAI's format."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def engine_failure_message(exc: BaseException) -> str:
    """What a client is told of a stopped engine: the error's first line. A failed
    worker's error goes on with its Python traceback, naming the server's files, which
    stays in the server's log (AsyncLLM logs an engine failure once)."""
    first, _, rest = str(exc).partition("\n")
    return f"{first} (the rest is in the server's log)" if rest.strip() else first


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _drop_unknown_empty_fields(cls, data: Any) -> Any:
        """A field this server does not know set to null, or to an empty object or array,
        asks for nothing, so it is dropped rather than refused: clients that write every
        field of OpenAI's schema send `"tools": null`, and the openai client's
        `message.model_dump()`, sent back as the next turn's history, carries
        `"refusal": null` and `"tool_calls": null`."""
        if not isinstance(data, dict):
            return data
        return {key: value for key, value in data.items()
                if key in cls.model_fields or value not in (None, {}, [])}


def _one_of(forms: str) -> WrapValidator:
    """A union field's error as the forms it takes. pydantic reports the first member's
    error alone ("prompt.str: Input should be a valid string" for token ids with a float
    among them, or for a chat message with an image part), which misleads."""
    def validate(value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("union", f"must be {forms}") from None
    return WrapValidator(validate)


# OpenAI's API documents these as nullable, null meaning the default, and clients that
# write every field send it so.
_NULL_IS_DEFAULT = ("n", "stream", "logprobs", "echo")


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    """Fields common to both endpoints; those after `seed` are extensions to OpenAI's API."""

    model: str
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: Annotated[Union[str, list[str], None],
                    _one_of("a string, a list of strings or null")] = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # Token ids as strings of digits (JSON's keys are strings) to biases.
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    allowed_token_ids: list[int] | None = None
    min_tokens: int | None = None
    prompt_logprobs: int | None = Field(default=None, ge=0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    # The fields that ask for a top-n of logprobs, bounded by the engine's max_logprobs.
    top_n_fields: ClassVar[tuple[str, ...]] = ("prompt_logprobs",)

    @field_validator(*_NULL_IS_DEFAULT, mode="before", check_fields=False)
    @classmethod
    def _null_is_default(cls, value: Any, info: Any) -> Any:
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _empty_bias_is_none(cls, value: Any) -> Any:
        """`{}` biases nothing: LangChain's completions model sends it with every request."""
        return None if value == {} else value

    @field_validator("n")
    @classmethod
    def _n_in_range(cls, n: int) -> int:
        """n within this server's bound (SamplingParams' own names 4096, not MAX_N)."""
        if not 1 <= n <= MAX_N:
            raise PydanticCustomError("n", f"must be an integer from 1 to {MAX_N}")
        return n

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None,
                        sent_as: dict[str, str] | None = None) -> SamplingParams:
        """The SamplingParams this request asks for (prompt logprobs: `prompt_logprobs`
        when given, else the extension field); RequestError naming a bad field, and any
        other it names, as the client sent it: `sent_as` maps a SamplingParams field to
        the request's (chat's max_completion_tokens for max_tokens)."""
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed with stream=true: a whole "
                               "response always carries its usage", "stream_options")
        given = {name: getattr(self, name) for name in
                 ("n", "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed",
                  "top_k", "min_p", "repetition_penalty", "stop_token_ids", "min_tokens",
                  "allowed_token_ids")
                 if getattr(self, name) is not None}
        if self.logit_bias is not None:
            given["logit_bias"] = _token_keys(self.logit_bias)
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            return SamplingParams(**given, max_tokens=max_tokens, stop=stop, logprobs=logprobs,
                                  prompt_logprobs=(self.prompt_logprobs if prompt_logprobs is None
                                                   else prompt_logprobs),
                                  ignore_eos=self.ignore_eos,
                                  skip_special_tokens=self.skip_special_tokens)
        except ValueError as exc:
            message = str(exc).removeprefix("SamplingParams.")
            for name, sent in (sent_as or {}).items():
                message = re.sub(rf"\b{name}=", f"{sent}=", message)
            raise RequestError(message, field_of(message)) from None


class CompletionRequest(_SamplingFields):
    """POST /v1/completions: `prompt` is a string, a list of strings, a list of token ids
    or a list of such lists; each prompt gets `n` choices. `echo` leads each choice with
    its prompt (with `logprobs`, the prompt tokens' logprobs too, the first None), and
    then takes max_tokens 0: the prompt alone (the engine makes one token, not shown)."""

    prompt: Annotated[Union[str, list[str], list[int], list[list[int]]],
                      _one_of("a string, a list of strings, a list of token ids (integers) "
                              "or a list of lists of token ids")]
    max_tokens: int | None = 16
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False
    suffix: None = None
    best_of: int | None = None
    top_n_fields = ("logprobs", "prompt_logprobs")

    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        if not prompt:
            raise RequestError("prompt is empty: pass a string, a list of token ids, or a "
                               "non-empty list of either", "prompt")
        if len(prompt) * self.n > MAX_COMPLETIONS:
            raise RequestError(f"prompt lists {len(prompt)} prompts, which at n={self.n} ask "
                               f"for {len(prompt) * self.n} completions, more than the "
                               f"{MAX_COMPLETIONS} one request may: send them in several "
                               "requests", "prompt")
        return list(prompt)

    def max_tokens_field(self) -> str | None:
        """The field that asked for a number of tokens, None when the default (16) holds."""
        return ("max_tokens" if "max_tokens" in self.model_fields_set
                and self.max_tokens is not None else None)

    @property
    def echo_only(self) -> bool:
        """Whether the choices are the echoed prompts alone (echo with max_tokens 0)."""
        return self.echo and self.max_tokens == 0

    def to_sampling_params(self) -> SamplingParams:
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError(f"best_of={self.best_of} is not supported: only best_of equal to "
                               f"n ({self.n}) or unset", "best_of")
        if self.max_tokens == 0 and not self.echo:
            raise RequestError("max_tokens=0 asks for no tokens, which only echo=true takes "
                               "(to score the prompt): ask for at least 1", "max_tokens")
        if self.echo_only and self.min_tokens:
            # Checked here: the engine is asked for one token, not shown.
            raise RequestError(f"min_tokens={self.min_tokens} is invalid: must be 0 with "
                               "max_tokens=0 (the echoed prompt alone)", "min_tokens")
        # An echo with logprobs scores the prompt too, with as many alternatives.
        asked = [k for k in (self.logprobs if self.echo else None, self.prompt_logprobs)
                 if k is not None]
        return self.sampling_params(1 if self.echo_only else self.max_tokens, self.logprobs,
                                    max(asked, default=None))


def _token_keys(bias: dict[str, float]) -> dict[int, float]:
    """logit_bias as SamplingParams takes it: OpenAI's keys, token ids as strings of
    digits, as ints (which SamplingParams and the engine check against the vocabulary)."""
    for key in bias:
        if not _TOKEN_KEY.fullmatch(key):
            raise RequestError(f"logit_bias has the key {key!r}, which is not a token id: keys "
                               "must be token ids written in digits, such as \"50256\"",
                               "logit_bias")
    return {int(key): value for key, value in bias.items()}


# How a refused value is shown back: its start, so a huge bad value (a 100k-token prompt
# with one float in it) does not make a message of the same size.
_ECHO = reprlib.Repr()
_ECHO.maxlevel = 4
_ECHO.maxlist = _ECHO.maxtuple = _ECHO.maxdict = _ECHO.maxset = 12
_ECHO.maxstring = _ECHO.maxlong = _ECHO.maxother = 160

# Up to 20 digits: 2**63 - 1 has 19, so more is refused as too large, not parsed at length.
_TOKEN_KEY = re.compile(r"[0-9]{1,20}")


def parse(model: type[_Body], body: Any) -> Any:
    """`body` (decoded JSON) as a `model`, or a RequestError naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestError(f"the body is {_json_kind(body)}, not a JSON object", None)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        location = [str(part) for part in error["loc"]]
        param = ".".join(location) if location else None
        if error["type"] == "extra_forbidden":
            owner = _body_at(model, error["loc"][:-1])
            raise RequestError(f"{param} is not supported by this server; it accepts "
                               f"{', '.join(sorted(owner.model_fields))}", param) from None
        if error["type"] == "missing":
            raise RequestError(f"{param} is required", param) from None
        if "field" in error.get("ctx", {}):   # a check of fields together names the one
            path = ".".join([*location, error["ctx"]["field"]])
            raise RequestError(f"{path} {error['msg']}", path) from None
        raise RequestError(f"{param}: {error['msg']} (got {_ECHO.repr(error.get('input'))})",
                           location[0] if location else None) from None


def _json_kind(value: Any) -> str:
    """What JSON calls a decoded value's type (the body `null` is not a "NoneType")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "a string" if isinstance(value, str) else "an array"


def _body_at(model: type[_Body], location: tuple) -> type[_Body]:
    """The body type of the object at `location` in a `model` (messages.0 of a chat
    request: a ChatMessage), so that a field it does not take is answered with the fields
    it does, not the request's."""
    for part in location:
        if isinstance(part, str):
            inner = _bodies_in(model.model_fields[part].annotation)
            if not inner:
                break
            model = inner[0]
    return model


def _bodies_in(annotation: Any) -> list[type[_Body]]:
    """The body types an annotation holds (list[ChatMessage], StreamOptions | None)."""
    if isinstance(annotation, type) and issubclass(annotation, _Body):
        return [annotation]
    return [body for arg in get_args(annotation) for body in _bodies_in(arg)]


def field_of(message: str) -> str | None:
    """The field a SamplingParams or engine error names ("SamplingParams.top_p=2 ...",
    "stop=[...] needs ...", "stop_token_ids[1]=999 is outside ...")."""
    match = re.match(r"(?:SamplingParams\.)?(\w+)(?:\[\d+\])?\s*=", message)
    return match.group(1) if match else None
