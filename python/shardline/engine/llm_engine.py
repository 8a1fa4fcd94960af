"""The engine loop shared by LLM and AsyncLLM: accept requests, step, return outputs.

Each step: the scheduler picks the work, the executor runs it on the workers, the
scheduler records the sampled tokens, and the output processor applies stop conditions.
Bad requests are rejected in `add_request` with a ValueError naming the problem, before
they touch any state, so one bad request never disturbs the others.
"""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import dataclasses
import itertools
import reprlib
from typing import Iterator, Protocol

from shardline.config import EngineConfig
from shardline.engine.kv_blocks import KVBlockManager
from shardline.engine.metrics import EngineMetrics
from shardline.engine.output_processor import OutputProcessor, RequestState
from shardline.engine.outputs import RequestOutput
from shardline.engine.prompts import PromptType, parse_prompt, token_ids_name
from shardline.engine.request_checks import check_vocabulary_fields
from shardline.engine.request_checks import (check_logprobs, check_min_tokens,
                                             check_request_id, token_ids)
from shardline.sampling_params import SamplingParams
from shardline.step import SchedulerOutput
from shardline.engine.scheduler import Scheduler, SchedulerStats
from shardline.engine.sequence import Sequence
from shardline.engine.tokenizer import Tokenizer
from shardline.executor.base import Executor, StepFuture, create_executor
from shardline.models.loader import read_model_info

class ModelLimits(Protocol):
    """What the engine needs to know about the model (shardline.models.loader.ModelInfo)."""

    vocab_size: int
    max_position_embeddings: int
    eos_token_ids: list[int]


class TextCodec(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...


class LLMEngine:
    """Continuous-batching engine for one model replica set, behind one executor."""

    def __init__(self, config: EngineConfig, executor: Executor, model_info: ModelLimits,
                 tokenizer: TextCodec | None) -> None:
        self.config = config
        self.executor = executor
        self.tokenizer = tokenizer
        self.vocab_size = model_info.vocab_size
        self.max_model_len = resolve_max_model_len(config, model_info)
        cache = config.cache
        self.kv = KVBlockManager(executor.num_kv_blocks, cache.block_size,
                                 cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv, executor.max_concurrent_steps,
                                   schedule_ahead=uses_async_scheduling(config, executor))
        self._in_flight: collections.deque[tuple[SchedulerOutput, StepFuture]] = \
            collections.deque()
        self._failure: BaseException | None = None
        self.outputs = OutputProcessor(self.scheduler, model_info.eos_token_ids)
        self._arrival = itertools.count()
        self.step_metrics = EngineMetrics()

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLMEngine":
        """Build the executor and workers for `config.model.model`, a model directory."""
        model_dir = config.model.model
        model_info = read_model_info(model_dir)
        resolve_max_model_len(config, model_info)
        tokenizer = Tokenizer.from_model_dir(model_dir)
        return cls(config, create_executor(config), model_info, tokenizer)

    @property
    def stats(self) -> SchedulerStats:
        return self.scheduler.stats

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv.num_blocks * self.kv.block_size

    def add_request(self, request_id: str, prompt: PromptType,
                    params: SamplingParams | None = None, *,
                    prompt_token_ids: list[int] | None = None) -> None:
        """Queue a request; raises ValueError (and queues nothing) if it is malformed, or if
        its prompt and max_tokens could never fit in the KV cache, even alone.

        A sequence ends with "length" at max_model_len tokens (prompt included) when
        max_tokens asks for more; with max_tokens=None, at the KV cache's capacity if that
        is smaller than max_model_len. A prompt of max_model_len tokens still gets one
        token (sampled from its last position, as vLLM does), which ends it.

        `prompt_token_ids`, when given, are meant to be what `encode_prompt(prompt, params)`
        returned: the prompt is then not tokenized again, and the ids are checked at a
        fraction of the cost of encode_prompt's checks, yet as strictly, since ids out of the
        vocabulary or a prompt that can never run would fail a step and stop the engine.
        """
        check_request_id(request_id)
        if request_id in self.outputs.requests:
            raise ValueError(f"request_id={request_id!r} is already in use by an unfinished "
                             "request")
        params = SamplingParams() if params is None else params
        if prompt_token_ids is None:
            prompt_text, prompt_ids = self.encode_prompt(prompt, params)
        else:
            self._check_params(params)
            prompt_text = parse_prompt(prompt)[0]
            prompt_ids = self._checked_token_ids(prompt_token_ids, params)
        max_len = min(self.max_model_len, self.kv_capacity_tokens + 1)
        seqs: list[Sequence] = []
        for i in range(params.n):
            child = dataclasses.replace(params, n=1,
                                        seed=None if params.seed is None else params.seed + i)
            seq_id = request_id if params.n == 1 else f"{request_id}#{i}"
            leader = seqs[0] if seqs and self.kv.enable_prefix_caching else None
            seqs.append(Sequence(seq_id, request_id, i, prompt_ids, child,
                                 next(self._arrival), max_len, leader))
        # A finished request's id is free at once, even while a step in flight still holds
        # its sequence (the new one waits for it): only a sequence of another request,
        # named like one of these, is in the way.
        taken = [seq.seq_id for seq in seqs if seq.seq_id in self.scheduler.seqs]
        if taken:
            raise ValueError(f"request_id={request_id!r} clashes with the running sequence "
                             f"{taken[0]!r}: choose another id")
        self.outputs.add(RequestState(request_id, prompt_text, prompt_ids, seqs, self.tokenizer))
        for seq in seqs:
            self.scheduler.add(seq)

    def _check_fits_kv_cache(self, prompt_len: int, max_tokens: int | None) -> None:
        """Refuse a request whose prompt and max_tokens need more KV than the whole cache
        holds (possible only when the cache is smaller than max_model_len)."""
        needed = prompt_len
        if max_tokens is not None:
            # The KV of the last sampled token is never computed.
            needed = max(prompt_len, min(prompt_len + max_tokens, self.max_model_len) - 1)
        capacity = self.kv_capacity_tokens
        if needed > capacity:
            asked, fix = ((f" and max_tokens={max_tokens}", "lower max_tokens")
                          if needed > prompt_len else ("", "shorten the prompt"))
            raise ValueError(
                f"prompt has {prompt_len} tokens{asked}: the sequence needs KV for {needed} "
                f"tokens and can never fit in the KV cache, which holds {capacity} "
                f"({self.kv.num_blocks} blocks x {self.kv.block_size} tokens, fewer than "
                f"max_model_len={self.max_model_len}): {fix} or give the KV cache more "
                "memory (gpu_memory_utilization, kv_cache_memory_bytes, num_kv_blocks)")

    def encode_prompt(self, prompt: PromptType, params: SamplingParams
                      ) -> tuple[str | None, list[int]]:
        """Validate a prompt and its params for this engine; return (text, token ids).

        A prompt is a string, a list of token ids, or a TextPrompt / TokensPrompt dict of
        either (engine.prompts); anything else (None, a number, bytes, bools as ids, a dict
        with another key) raises ValueError, as a bad value does. The text is the one
        RequestOutput.prompt reports: a TokensPrompt's "prompt", None for bare token ids.
        """
        self._check_params(params)
        text, source = parse_prompt(prompt)
        if isinstance(source, str):
            if self.tokenizer is None:
                raise ValueError("prompt is text, but the model has no tokenizer.json: pass "
                                 "token ids")
            try:
                source.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"prompt holds {source[exc.start]!r} at index {exc.start}, a "
                                 "lone UTF-16 surrogate, which is not text and cannot be "
                                 "tokenized") from None
            ids = token_ids(self.tokenizer.encode(source), "prompt", self.vocab_size)
        else:
            ids = token_ids(source, token_ids_name(prompt), self.vocab_size)
        self._check_prompt_length(ids, params)
        return text, ids

    def _check_params(self, params: object) -> None:
        """Refuse params that are not a valid SamplingParams for this model."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params={reprlib.repr(params)} "
                             f"({type(params).__name__}) is not a SamplingParams: pass one, "
                             "or None for the defaults")
        params.validate()
        check_logprobs(params, self.vocab_size, self.config.model.max_logprobs)
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop={params.stop!r} needs a tokenizer, and the model has no "
                             "tokenizer.json: use stop_token_ids instead")
        token_ids(params.stop_token_ids, "stop_token_ids", self.vocab_size)
        check_vocabulary_fields(params, self.vocab_size)
        check_min_tokens(params, self.outputs.eos_token_ids, self.vocab_size)

    def _checked_token_ids(self, ids: object, params: SamplingParams) -> list[int]:
        """Token ids given with a request, as encode_prompt would return them, or a
        ValueError naming the problem. Ids that are a list of plain ints in the vocabulary
        (encode_prompt's always are) pass on three quick scans of the list."""
        if not (type(ids) is list and ids and set(map(type, ids)) == {int}
                and min(ids) >= 0 and max(ids) < self.vocab_size):
            ids = token_ids(ids, "prompt_token_ids", self.vocab_size)
        self._check_prompt_length(ids, params)
        return ids

    def _check_prompt_length(self, ids: list[int], params: SamplingParams) -> None:
        """Refuse an empty prompt, or one that could never run: longer than max_model_len,
        than one step's budget without chunked prefill, or than the KV cache holds."""
        if not ids:
            raise ValueError("prompt is empty: at least one token is required")
        if len(ids) > self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens, longer than "
                             f"max_model_len={self.max_model_len}")
        scheduler = self.config.scheduler
        if not scheduler.enable_chunked_prefill and len(ids) > scheduler.max_num_batched_tokens:
            raise ValueError(f"prompt has {len(ids)} tokens, more than max_num_batched_tokens="
                             f"{scheduler.max_num_batched_tokens}, and enable_chunked_prefill "
                             "is off: raise the budget or enable chunked prefill")
        self._check_fits_kv_cache(len(ids), params.max_tokens)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks; returns its final output, None if unknown."""
        output = self.outputs.abort(request_id)
        if output is not None:
            self.step_metrics.request_finished(output)
        return output

    def has_unfinished_requests(self) -> bool:
        """Whether a request is unfinished, or a step is still in flight (it may hold the
        KV blocks of a request aborted meanwhile)."""
        return bool(self.outputs.requests) or bool(self._in_flight)

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return outputs of the requests that gained tokens.

        Steps are sent until one per pipeline stage is in flight (one in all without
        pipeline parallelism, two under async scheduling) or nothing is left to schedule;
        then the oldest is awaited.
        A step that fails (a dead worker: EngineDeadError) leaves the engine stopped: this
        and every later call raise that error.
        """
        self.send_steps()
        return self.collect_step()

    @property
    def num_steps_in_flight(self) -> int:
        return len(self._in_flight)

    def send_steps(self) -> None:
        """The first half of `step`: schedule and send steps, without waiting for any, until
        as many as `step` keeps are in flight or nothing is left to schedule. A data-parallel
        front end sends on every core first, then collects, so the cores run at once."""
        with self._stop_on_failure():
            while len(self._in_flight) < self.scheduler.max_steps_in_flight:
                scheduled = self.scheduler.schedule()
                if scheduled.is_empty:
                    break
                self.step_metrics.step_sent()
                self._in_flight.append(
                    (scheduled, self.executor.execute_model(scheduled, non_block=True)))
            if not self._in_flight and self.scheduler.has_unfinished():
                raise RuntimeError("the scheduler could not make progress on any of "
                                   f"{len(self.scheduler.seqs)} unfinished sequences")

    def send_dummy_step(self) -> None:
        """Send a step with no requests (see ModelRunner.execute_model): a data-parallel
        core with less work than the others runs it so that collectives spanning the cores
        stay in step. It holds a place among the steps in flight and returns no outputs."""
        with self._stop_on_failure():
            dummy = SchedulerOutput()
            self.step_metrics.step_sent()
            self._in_flight.append((dummy, self.executor.execute_model(dummy, non_block=True)))

    def collect_step(self) -> list[RequestOutput]:
        """The second half of `step`: wait for the oldest step in flight and return the
        outputs of the requests that gained tokens in it ([] if none is in flight)."""
        if not self._in_flight:
            return []
        with self._stop_on_failure():
            scheduled, future = self._in_flight.popleft()
            result = future.result()
        if scheduled.is_empty:
            self.step_metrics.step_collected(0, [], 0)
            return []
        sampled = self.scheduler.update(scheduled, result)
        outputs = self.outputs.process(sampled)
        self.step_metrics.step_collected(scheduled.total_num_scheduled_tokens, outputs,
                                         len(sampled))
        return outputs

    def collect_idle_steps(self) -> None:
        """Once no request is unfinished, wait for the steps still in flight: under async
        scheduling, steps sent ahead of the tokens that ended their sequences. Their KV
        blocks come back, and the engine is idle again."""
        while self._in_flight and not self.outputs.requests:
            self.collect_step()

    @contextlib.contextmanager
    def _stop_on_failure(self) -> Iterator[None]:
        """Raise the error that stopped the engine; record one raised inside, since the
        scheduler's steps in flight will then never come back."""
        if self._failure is not None:
            raise self._failure
        try:
            yield
        except BaseException as exc:
            self._failure = exc
            raise

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None,
                       timeout: float | None = None) -> list:
        """Call a worker method on every rank (see Executor.collective_rpc), e.g. for
        communication statistics; one reply per rank, in rank order."""
        return self.executor.collective_rpc(method, args, kwargs, timeout)

    def shutdown(self) -> None:
        self.executor.shutdown()


def resolve_max_model_len(config: EngineConfig, model_info: ModelLimits) -> int:
    """config.model.max_model_len, or the model's max_position_embeddings where it is None;
    a ValueError if it is more than the model's positions. Checked before any worker starts,
    so that a bad length fails at once and not after loading the weights."""
    limit = model_info.max_position_embeddings
    length = config.model.max_model_len or limit
    if length > limit:
        raise ValueError(f"max_model_len={length} is invalid: the model supports at most "
                         f"{limit} positions (its max_position_embeddings); pass at most "
                         f"{limit}, or None for exactly that")
    return length


def uses_async_scheduling(config: EngineConfig, executor: Executor) -> bool:
    """config.scheduler.async_scheduling, or where that is None: on without a pipeline (whose
    steps are already in flight together) or sequence parallelism, where the executor
    computes beside the engine (see Executor.hides_host_time); with tensor parallelism on
    GPUs only. CPU ranks share the cores with the engine, and there the broadcast of each
    step's tokens to the tensor-parallel ranks cost more than the overlap hid
    (bench/async_scheduling.py -tp 2: 0.99x the tokens/s at batch 1, 0.81x at 16, 0.96x
    at 64)."""
    from shardline.worker.worker import pick_device

    wanted = config.scheduler.async_scheduling
    if wanted is not None:
        return wanted
    parallel = config.parallel
    if parallel.pipeline_parallel_size > 1 or parallel.sequence_parallel_size > 1:
        return False
    if parallel.tensor_parallel_size > 1 and pick_device(0, parallel.device).type != "cuda":
        return False
    return executor.hides_host_time
