"""LLM: the offline entry point. Build once, then `generate` batches of prompts.

    llm = LLM("tiny-llama", max_num_seqs=16)
    outputs = llm.generate(["Hello", "The sky is"], SamplingParams(temperature=0))
    answers = llm.chat([{"role": "user", "content": "Hi!"}])   # a chat model's template

For serving, the incremental API (`add_request`, `step`, `abort_request`) exposes the same
engine one step at a time.

An LLM may be shared by threads: its calls run one at a time (a `generate` waits for
another thread's to finish). For requests that overlap in time, use AsyncLLM.
"""

from __future__ import annotations

import collections.abc
import contextlib
import numbers
import os
import reprlib
import sys
import threading
from typing import Any, Iterator, Sequence as Seq

from shardline.engine.data_parallel import DataParallelEngine, create_engine
from shardline.engine.chat_template import Message, check_conversation
from shardline.engine.engine_args import EngineArgs
from shardline.engine.failures import engine_dead, in_forked_child
from shardline.engine.llm_engine import LLMEngine
from shardline.engine.prompts import PromptType
from shardline.engine.request_checks import is_sequence
from shardline.engine.metrics import engine_metrics, stopped_engine_metrics
from shardline.engine.outputs import RequestOutput
from shardline.sampling_params import SamplingParams
from shardline.engine.scheduler import SchedulerStats
from shardline.executor.base import EngineDeadError


class LLM:
    """Offline batched generation over one engine.

    `model` is a Hugging Face checkpoint directory, a .gguf file or a preset name; the
    keyword options are EngineArgs fields (dtype, max_model_len, max_num_seqs, block_size,
    tensor_parallel_size, ...). A bad option, or a layout the model cannot take, raises
    ValueError naming it before any worker starts.

    A step that fails stops the engine (its state is lost): the call raises EngineDeadError
    with the error as its cause, or the interrupt itself (KeyboardInterrupt). Then, and
    after `shutdown`, every call that would run the engine raises EngineDeadError.
    """

    def __init__(self, model: str | os.PathLike[str], **kwargs) -> None:
        args = EngineArgs.from_options("LLM", model, kwargs)
        self._attach(create_engine(args.to_config()))

    @classmethod
    def from_engine(cls, engine: LLMEngine | DataParallelEngine) -> "LLM":
        """An LLM over an engine built elsewhere. Nothing else may step that engine
        meanwhile: an AsyncLLM over it steps it from its own thread."""
        llm = cls.__new__(cls)
        llm._attach(engine)
        return llm

    def _attach(self, engine: LLMEngine | DataParallelEngine) -> None:
        self.engine = engine
        self._built_by = os.getpid()
        self._next_id = 0
        # Held by every call that reads or runs the engine, which is not thread-safe.
        self._lock = threading.RLock()
        self._closed = False
        # What failed or interrupted a step: the engine keeps it as its failure (that
        # step's tokens are lost), so it can run no more.
        self._failure: BaseException | None = None

    @property
    def stats(self) -> SchedulerStats:
        """Running totals: steps, computed and prefix-cached tokens, preemptions (all data-
        parallel cores added up)."""
        return self.engine.stats

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order.

        `prompts` is one prompt or a list of them, in any mix: a string, a token-id list,
        or vLLM's dict forms, a TextPrompt `{"prompt": text}` (as the text) or a
        TokensPrompt `{"prompt_token_ids": ids}` (as the ids; an optional "prompt" is only
        reported as the output's prompt); a dict with any other key is refused.
        `sampling_params` is one SamplingParams for all, a list with one per prompt, or None
        for the defaults.
        Every prompt is validated (and tokenized, once) before any runs: a bad one raises
        ValueError naming its index, and none runs. Requests added with `add_request` keep
        running meanwhile, but their outputs from these steps are not returned. If the
        call ends by an exception (a KeyboardInterrupt, `shutdown` from another thread),
        its requests are aborted.
        """
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(sampling_params, len(prompt_list))
        with self._running():
            return self._run(prompt_list, params_list, self._encode(prompt_list, params_list),
                             use_tqdm)

    def chat(self, messages: Seq[Message] | Seq[Seq[Message]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             add_generation_prompt: bool = True, use_tqdm: bool = False,
             tools: list[dict] | None = None) -> list[RequestOutput]:
        """Answer one conversation (a list of {"role", "content"} dicts) or a list of them;
        outputs come back in input order, each with the rendered prompt as `prompt`.

        Each conversation is rendered with the model's chat template (ending with the
        assistant's turn when `add_generation_prompt`) and tokenized as is: the template
        writes the special tokens itself. `tools` (OpenAI-style function definitions) are
        given to a template that reads them, and refused by one that does not; a tool call
        in the reply comes back as the model writes it, in its text. `sampling_params` as
        in `generate`.
        """
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer, and the model has no tokenizer.json")
        one = not is_sequence(messages) or not messages or not is_sequence(messages[0])
        conversations = [messages] if one else list(messages)
        texts = []
        for i, conversation in enumerate(conversations):
            where = "messages" if one else f"messages[{i}]"
            texts.append(tokenizer.apply_chat_template(check_conversation(conversation, where),
                                                       add_generation_prompt, tools))
        params_list = _as_params_list(sampling_params, len(texts))
        token_ids = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
        with self._running():
            return self._run(texts, params_list, self._encode(token_ids, params_list),
                             use_tqdm)

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        """Hold the engine for one call; EngineDeadError if it can run no more, or not in
        this process (a fork of the one that built it, where the lock may be held)."""
        self._refuse_in_forked_child()
        with self._lock:
            if self._closed:
                raise EngineDeadError("the LLM was shut down: build a new one")
            failure = self._failure
            if failure is not None:
                how = "failed" if isinstance(failure, Exception) else "was interrupted"
                what = type(failure).__name__ + (f": {failure}" if str(failure) else "")
                raise EngineDeadError(f"a step of this LLM {how} ({what}), so its results are "
                                      "lost and the engine runs no more: build a new LLM"
                                      ) from failure
            yield

    @contextlib.contextmanager
    def _stepping(self) -> Iterator[None]:
        """Run the engine's steps; what ends them by an exception stops the engine. An
        Exception is raised as the EngineDeadError of engine_dead, an interrupt as it is."""
        try:
            yield
        except Exception as exc:
            self._failure = exc
            raise engine_dead(exc)
        except BaseException as exc:
            self._failure = exc
            raise

    def _encode(self, prompts: list[PromptType], params_list: list[SamplingParams]
                ) -> list[list[int]]:
        """Validate and tokenize every prompt before any runs; ValueError naming the index."""
        encoded = []
        for i, (prompt, params) in enumerate(zip(prompts, params_list)):
            try:
                encoded.append(self.engine.encode_prompt(prompt, params)[1])
            except ValueError as exc:
                raise ValueError(f"prompt {i}: {exc}") from exc
        return encoded

    def _run(self, prompt_list: list[PromptType], params_list: list[SamplingParams],
             encoded: list[list[int]], use_tqdm: bool) -> list[RequestOutput]:
        """Queue the validated prompts (token ids `encoded`), step until all finish; abort
        the unfinished ones if that ends by an exception."""
        ids: list[str] = []
        final: dict[str, RequestOutput] = {}
        try:
            for prompt, params, prompt_token_ids in zip(prompt_list, params_list, encoded):
                ids.append(f"gen-{self._next_id}")
                self._next_id += 1
                self.engine.add_request(ids[-1], prompt, params,
                                        prompt_token_ids=prompt_token_ids)
            own = set(ids)
            while len(final) < len(ids):
                if self._closed:
                    raise EngineDeadError("the LLM was shut down during generate")
                with self._stepping():
                    outputs = self.engine.step()
                for output in outputs:
                    if output.finished and output.request_id in own:
                        final[output.request_id] = output
                        if use_tqdm:
                            print(f"\rfinished {len(final)}/{len(ids)}", end="",
                                  file=sys.stderr)
        except BaseException:
            for request_id in ids:
                if request_id not in final:
                    self.engine.abort_request(request_id)
            raise
        with self._stepping():
            self.engine.collect_idle_steps()
        if use_tqdm:
            print(file=sys.stderr)
        return [final[i] for i in ids]

    def add_request(self, request_id: str, prompt: PromptType,
                    params: SamplingParams | None = None) -> None:
        """Queue one request; a bad prompt or params raise ValueError for it alone."""
        with self._running():
            self.engine.add_request(request_id, prompt, params)

    def step(self) -> list[RequestOutput]:
        """Run one engine step; return the outputs of the requests that gained tokens."""
        with self._running(), self._stepping():
            return self.engine.step()

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its KV blocks; its final output, or None if unknown."""
        with self._running():
            return self.engine.abort_request(request_id)

    def metrics(self) -> dict[str, Any]:
        """Running and waiting requests, KV blocks used, prefix-cache hit rate, preemptions,
        token rates, step-time percentiles and, under the multi-process executor, each
        rank's step times, as a plain dict (keys: see engine.metrics.engine_metrics). Once
        the engine has stopped (failed or shut down) they count no request running or
        waiting and no KV block in use, and leave out the per-rank step times."""
        self._refuse_in_forked_child()
        with self._lock:
            if self._closed or self._failure is not None:
                return stopped_engine_metrics(self.engine)
            return engine_metrics(self.engine)

    def has_unfinished_requests(self) -> bool:
        """Whether any request is still waiting or running."""
        with self._lock:
            return self.engine.has_unfinished_requests()

    def shutdown(self) -> None:
        """Stop the workers (their processes, under several ranks); idempotent. A
        `generate` running in another thread ends after its current step, raising
        EngineDeadError; shutdown waits for that. In a fork of the process that built the
        LLM it only closes this copy: the workers serve the parent."""
        self._closed = True
        if in_forked_child("LLM", self._built_by) is not None:
            return
        with self._lock:
            self.engine.shutdown()

    def _refuse_in_forked_child(self) -> None:
        forked = in_forked_child("LLM", self._built_by)
        if forked is not None:
            raise forked

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


def _as_prompt_list(prompts: PromptType | Seq[PromptType]) -> list[PromptType]:
    if isinstance(prompts, (str, collections.abc.Mapping)):
        return [prompts]
    if not is_sequence(prompts):
        raise ValueError(f"prompts={reprlib.repr(prompts)} ({type(prompts).__name__}) is "
                         "invalid: pass a prompt (a string, a list of token ids, or a dict "
                         "with 'prompt' and/or 'prompt_token_ids') or a list of prompts")
    prompts = list(prompts)
    # numbers.Integral: numpy's integers too, as token ids often come from an array.
    if prompts and all(isinstance(p, numbers.Integral) for p in prompts):
        return [prompts]
    return prompts


def _as_params_list(sampling_params: SamplingParams | Seq[SamplingParams] | None,
                    count: int) -> list[SamplingParams]:
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        return [sampling_params or SamplingParams()] * count
    if not is_sequence(sampling_params):
        raise ValueError(f"sampling_params={reprlib.repr(sampling_params)} "
                         f"({type(sampling_params).__name__}) is invalid: pass a SamplingParams, "
                         "a list with one per prompt, or None for the defaults")
    params_list = [SamplingParams() if p is None else p for p in sampling_params]
    if len(params_list) != count:
        raise ValueError(f"sampling_params has {len(params_list)} entries for {count} "
                         "prompts: pass one, or one per prompt")
    return params_list
