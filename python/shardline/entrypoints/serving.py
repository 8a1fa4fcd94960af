"""Completions and chat completions over an AsyncLLM: run a request's prompts, then shape
the outputs as OpenAI's response objects, whole or as server-sent-event chunks.

Every prompt of a request is one engine request (its `n` completions are the engine's
sequences); their streams are merged as they produce. Closing the merged stream (the
client went away) cancels every engine stream, which aborts its request and frees its KV
blocks. A chunk carries the tokens a completion gained since the last and the text they
completed, which may be empty (a token that is part of a multi-byte character, or text
held back while it could still begin a stop string): a client sees each token when the
engine makes it, as vLLM streams them (a client more than MAX_UNREAD chunks behind gets
the tokens of several steps in one; see engine.output_queue). The engine never takes text
back, so the chunks add up to the final text. A completions choice that echoes its
prompt carries it (and its tokens' logprobs, when asked) in its first chunk.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from typing import AsyncIterator

from shardline.engine.async_llm import AsyncLLM
from shardline.engine.output_queue import OutputQueue
from shardline.engine.outputs import CompletionOutput, RequestOutput
from shardline.entrypoints.logprobs import (Decode, LegacyLogprobs, chat_logprobs,
                                            prompt_logprobs)
from shardline.engine.chat_template import UnsupportedByTemplate
from shardline.entrypoints.chat_protocol import ChatCompletionRequest
from shardline.entrypoints.protocol import (CompletionRequest, RequestError,
                                            engine_failure_message, error_body, field_of)
from shardline.sampling_params import SamplingParams

_DONE = object()


class Generation:
    """One API request's engine requests, prepared (validated, tokenized) before any runs.

    A prompt whose length plus the tokens the request asked for (`max_tokens_field` names
    the field, None when a default holds) passes the model's context is refused, as
    OpenAI's API does; with a default the engine stops at the context ("length").
    """

    def __init__(self, llm: AsyncLLM, prompts: list[str | list[int]], params: SamplingParams,
                 prefix: str, prompt_field: str, max_tokens_field: str | None = None,
                 echo: bool = False, echo_only: bool = False,
                 prompt_top_n: int | None = None) -> None:
        self.llm = llm
        self.params = params
        # Completions: the prompt leads each choice; `echo_only` (max_tokens 0) drops the
        # one token the engine makes. `prompt_top_n`: the prompt_logprobs extension's k.
        self.echo, self.echo_only, self.prompt_top_n = echo, echo_only, prompt_top_n
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        # Each prompt with its token ids, so that the engine neither validates nor tokenizes
        # it again on the event loop.
        self.prompts: list[tuple[str | list[int], list[int]]] = []
        for i, prompt in enumerate(prompts):
            where = prompt_field if len(prompts) == 1 else f"{prompt_field}[{i}]"
            try:
                token_ids = llm.engine.encode_prompt(prompt, params)[1]
            except ValueError as exc:
                param = _param(str(exc), prompt_field)
                raise RequestError(_name_prompt(str(exc), param in (prompt_field, "max_tokens"),
                                                where), param) from None
            if max_tokens_field is not None:
                _check_room(where, len(token_ids), max_tokens_field, params.max_tokens,
                            llm.engine.max_model_len)
            self.prompts.append((prompt, token_ids))

    async def stream(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, cumulative output) as any of the prompts gains tokens; a prompt
        whose outputs the consumer (the client) falls behind on skips steps, as in
        AsyncLLM.generate, so that a client that stops reading holds little memory."""
        queue = OutputQueue()

        async def pump(index: int, prompt: str | list[int], token_ids: list[int]) -> None:
            try:
                async for output in self.llm.generate(prompt, self.params,
                                                      f"{self.id}-{index}", token_ids):
                    queue.put(index, output)
                queue.put(index, _DONE)
            except Exception as exc:
                queue.put(index, exc)

        tasks = [asyncio.create_task(pump(i, prompt, ids))
                 for i, (prompt, ids) in enumerate(self.prompts)]
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                if item is _DONE:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def final(self) -> list[RequestOutput]:
        """Every prompt's finished output, in prompt order."""
        outputs: list[RequestOutput | None] = [None] * len(self.prompts)
        async for index, output in self.stream():
            outputs[index] = output
        return outputs  # type: ignore[return-value]


def _check_room(where: str, length: int, field: str, asked: int, context: int) -> None:
    """Refuse a prompt of `length` tokens whose `asked` tokens more (`field` names them)
    pass the model's context, saying how many fit, or that none do."""
    if length + asked <= context:
        return
    fits = (f"ask for at most {context - length} or shorten the prompt" if length < context
            else "the prompt leaves no room for any: shorten it")
    raise RequestError(f"{where} has {length} tokens and {field}={asked} asks for {asked} "
                       f"more, {length + asked} in all, past the model's context of {context} "
                       f"tokens: {fits}", field)


def _param(message: str, prompt_field: str) -> str:
    """The request field an engine error is about: max_tokens if the prompt does not fit
    with it, else the field the message starts with (stop, stop_token_ids[i]), else the
    prompt (its length or its tokens)."""
    if " and max_tokens=" in message:
        return "max_tokens"
    field = field_of(message)
    return prompt_field if field in (None, "prompt") else field


def _name_prompt(message: str, about_prompt: bool, where: str) -> str:
    """The engine's error, naming the prompt as the request does (`where`: prompt,
    prompt[1], messages) if it is `about_prompt`. The engine calls it "prompt" ("prompt
    has 600 tokens", "prompt[2]=999 is outside ..."): that name is replaced, where a prefix
    repeated it ("prompt: prompt has 600 tokens", "prompt[1]: prompt[2]=999")."""
    if not about_prompt:
        return message
    if re.match(r"prompt\b", message):
        return where + message[len("prompt"):]
    return f"{where}: {message}"


def check_top_n(llm: AsyncLLM, request: CompletionRequest | ChatCompletionRequest) -> None:
    """Refuse a top-n of logprobs past what the engine gives (its max_logprobs, or the
    vocabulary), naming the field the client sent and the bound. The engine's own error
    names its SamplingParams field (logprobs for chat's top_logprobs) and advises
    recreating the engine, which only its Python users can."""
    asked = {name: getattr(request, name) for name in request.top_n_fields
             if getattr(request, name) is not None}
    if not asked:
        return
    engine = llm.engine
    cap, vocab = engine.config.model.max_logprobs, engine.vocab_size
    limit, why = ((vocab, "the model's vocabulary size") if cap == -1 or cap > vocab else
                  (cap, "its max_logprobs (shardline serve --max-logprobs)"))
    for name, value in asked.items():
        if value > limit:
            raise RequestError(f"{name}={value} is more logprobs than this server gives: at "
                               f"most {limit}, {why}", name)


def completion_generation(llm: AsyncLLM, request: CompletionRequest) -> Generation:
    check_top_n(llm, request)
    return Generation(llm, request.prompts(), request.to_sampling_params(), "cmpl", "prompt",
                      None if request.echo_only else request.max_tokens_field(),
                      request.echo, request.echo_only,
                      request.prompt_logprobs)


def chat_generation(llm: AsyncLLM, request: ChatCompletionRequest) -> Generation:
    """Render the conversation (and its tools) with the model's chat template; its special
    tokens are written by the template, so the text is tokenized without adding any. Tool
    use the template would drop is refused naming where it is (tools, messages.i)."""
    check_top_n(llm, request)
    tokenizer = llm.engine.tokenizer
    if tokenizer is None:
        raise RequestError("the model has no tokenizer, so it cannot chat", "messages")
    if tokenizer.chat_template is None:
        raise RequestError("messages: the model has no chat template, so it cannot chat: "
                           "send a plain prompt to /v1/completions", "messages")
    try:
        text = tokenizer.apply_chat_template(request.conversation(),
                                             request.add_generation_prompt,
                                             request.tool_definitions())
    except UnsupportedByTemplate as exc:
        raise RequestError(str(exc), exc.param) from None
    except ValueError as exc:
        raise RequestError(f"messages: {exc}", "messages") from None
    prompt = tokenizer.encode(text, add_special_tokens=False)
    return Generation(llm, [prompt], request.to_sampling_params(), "chatcmpl", "messages",
                      request.max_tokens_field(), prompt_top_n=request.prompt_logprobs)


def usage(outputs: list[RequestOutput], echo_only: bool = False) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = 0 if echo_only else sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


class _Choice:
    """One completions choice as the client sees it, built up chunk by chunk (a whole
    response is one chunk): the echoed prompt first when asked, then the completion's
    tokens, none when the request asked for the echo alone (max_tokens 0)."""

    def __init__(self, generation: Generation, index: int, decode: Decode) -> None:
        self.generation, self.index, self.decode = generation, index, decode
        self.legacy = LegacyLogprobs(decode)
        self.started = False
        self.sent_text = self.sent_tokens = 0

    def chunk(self, output: RequestOutput, completion: CompletionOutput) -> dict:
        """text, logprobs and finish_reason of what the completion gained since the last
        chunk, with the prompt's echo and prompt_logprobs in the first."""
        generation = self.generation
        echo_only = generation.echo_only
        text = "" if echo_only else completion.text[self.sent_text:]
        start, self.sent_tokens = self.sent_tokens, len(completion.token_ids)
        self.sent_text = len(completion.text)
        runs = []
        choice: dict = {}
        if not self.started:
            self.started = True
            if generation.echo:
                prompt, ids = generation.prompts[self.index]
                text = (prompt if isinstance(prompt, str) else self.decode.text(ids)) + text
                runs.append((output.prompt_token_ids, output.prompt_logprobs,
                             generation.params.logprobs))
            if generation.prompt_top_n is not None:
                choice["prompt_logprobs"] = prompt_logprobs(
                    output.prompt_logprobs, output.prompt_token_ids, self.decode,
                    generation.prompt_top_n)
        logprobs = None
        if completion.logprobs is not None:
            if not echo_only:
                runs.append((completion.token_ids[start:], completion.logprobs[start:], None))
            parts = [self.legacy.add(*run) for run in runs]
            logprobs = {key: [v for part in parts for v in part[key]] for key in parts[0]}
        finish = completion.finish_reason
        return {"text": text, "logprobs": logprobs,
                "finish_reason": "length" if echo_only and finish else finish, **choice}


def completion_response(generation: Generation, outputs: list[RequestOutput], model: str,
                        decode: Decode) -> dict:
    n = generation.params.n
    choices = []
    for i, output in enumerate(outputs):
        for completion in output.outputs:
            choices.append({"index": i * n + completion.index,
                            **_Choice(generation, i, decode).chunk(output, completion)})
    return {"id": generation.id, "object": "text_completion", "created": generation.created,
            "model": model, "choices": choices,
            "usage": usage(outputs, generation.echo_only)}


def chat_response(generation: Generation, outputs: list[RequestOutput], model: str,
                  decode: Decode, top_n: int) -> dict:
    choices = []
    for completion in outputs[0].outputs:
        logprobs = (chat_logprobs(completion, decode, top_n)
                    if completion.logprobs is not None else None)
        choices.append({"index": completion.index,
                        "message": {"role": "assistant", "content": completion.text},
                        "logprobs": logprobs, "finish_reason": completion.finish_reason})
    return {"id": generation.id, "object": "chat.completion", "created": generation.created,
            "model": model, "choices": choices, "usage": usage(outputs),
            **_chat_prompt_logprobs(generation, outputs[0], decode)}


def _chat_prompt_logprobs(generation: Generation, output: RequestOutput,
                          decode: Decode) -> dict:
    """The prompt_logprobs extension of a chat response (top level, as vLLM has it)."""
    if generation.prompt_top_n is None:
        return {}
    return {"prompt_logprobs": prompt_logprobs(output.prompt_logprobs, output.prompt_token_ids,
                                               decode, generation.prompt_top_n)}


async def stream_events(generation: Generation, model: str, chat: bool, decode: Decode,
                        top_n: int, include_usage: bool) -> AsyncIterator[str]:
    """The response as server-sent events: a chunk per engine output that gave choices new
    tokens, with a choice for each (the chat role first), a usage chunk if asked, then
    [DONE]. A completions choice's first chunk carries its echo and prompt logprobs when
    asked (chat's prompt logprobs come with the first chunk that has tokens); a choice that
    echoes alone (max_tokens 0) has one chunk, once it is done. An engine error mid-stream
    ends it with an error event, since the 200 status line is already sent."""
    n = generation.params.n
    sent_text: dict[int, int] = {}
    sent_tokens: dict[int, int] = {}
    built: dict[int, _Choice] = {}
    closed: set[int] = set()
    finals: dict[int, RequestOutput] = {}
    kind = "chat.completion.chunk" if chat else "text_completion"
    head = {"id": generation.id, "object": kind, "created": generation.created, "model": model}
    first = True
    if chat:
        yield _event({**head, "choices": [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None} for i in range(n)]})
    try:
        async for index, output in generation.stream():
            if output.finished:
                finals[index] = output
            choices = []
            for completion in output.outputs:
                key = index * n + completion.index
                if key in closed:
                    continue
                done_tokens = sent_tokens.get(key, 0)
                if not completion.finished and (generation.echo_only
                                                or len(completion.token_ids) == done_tokens):
                    continue
                sent_tokens[key] = len(completion.token_ids)
                if completion.finished:
                    closed.add(key)
                if not chat:
                    choice = built.setdefault(key, _Choice(generation, index, decode))
                    choices.append({"index": key, **choice.chunk(output, completion)})
                    continue
                text = completion.text[sent_text.get(key, 0):]
                sent_text[key] = len(completion.text)
                logprobs = (chat_logprobs(completion, decode, top_n, done_tokens)
                            if completion.logprobs is not None else None)
                choices.append({"index": key, "delta": {"content": text}, "logprobs": logprobs,
                                "finish_reason": completion.finish_reason})
            if choices:
                extension = (_chat_prompt_logprobs(generation, output, decode)
                             if chat and first else {})
                first = False
                yield _event({**head, **extension, "choices": choices})
    except Exception as exc:
        yield error_event(engine_failure_message(exc))
        return
    if include_usage:
        yield _event({**head, "choices": [],
                      "usage": usage(list(finals.values()), generation.echo_only)})
    yield "data: [DONE]\n\n"


def error_event(message: str) -> str:
    """The event that ends a stream which cannot finish (its 200 is already sent)."""
    return _event(error_body(message, None, "server_error"))


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, allow_nan=False)}\n\n"
