"""Data parallelism: N engine cores behind one front end with the engine's interface.

Each core is a whole LLMEngine (its own scheduler, KV cache and executor over its slice of
the rank grid); the front end routes each new request to the least-loaded core, the one
whose unfinished sequences (waiting and running) hold the fewest tokens, and a request
stays on its core to the end. A step sends work on every core first and only then waits
for them, so the cores compute at the same time; it returns the outputs of all cores.
`LLM.generate` and `AsyncLLM` run over it unchanged: outputs still come back in request
order and stream per request.

When the cores share collectives (expert parallelism spans the DP ranks of a stage), every
core must run the same number of forwards in the same order: a core with fewer steps in
flight than the others is padded with dummy steps (one token, no KV, no sampling).
Without such collectives the cores are independent and idle cores run nothing.
"""

from __future__ import annotations

import dataclasses

from shardline.config import EngineConfig
from shardline.engine.llm_engine import LLMEngine, resolve_max_model_len
from shardline.engine.prompts import PromptType
from shardline.engine.outputs import RequestOutput
from shardline.engine.request_checks import check_request_id
from shardline.engine.scheduler import SchedulerStats
from shardline.engine.tokenizer import Tokenizer
from shardline.executor.data_parallel import create_data_parallel_executors
from shardline.models.loader import read_model_info
from shardline.sampling_params import SamplingParams


def create_engine(config: EngineConfig) -> LLMEngine | DataParallelEngine:
    """The engine for `config`: one LLMEngine, or a DataParallelEngine over one per
    data-parallel rank. Its workers are started and ready."""
    if config.parallel.data_parallel_size == 1:
        return LLMEngine.from_config(config)
    return DataParallelEngine.from_config(config)


class DataParallelEngine:
    """Routes requests over data-parallel engine cores and steps them together.

    It offers what LLM and AsyncLLM use of an LLMEngine: encode_prompt, add_request, step,
    abort_request, has_unfinished_requests, stats, collective_rpc and shutdown.
    `dummy_steps` pads idle cores with dummy steps (see the module docstring); it is on
    when expert parallelism spans the cores, and may be turned on to exercise the path.
    """

    def __init__(self, cores: list[LLMEngine], dummy_steps: bool = False) -> None:
        if not cores:
            raise ValueError("cores=[] is invalid: a data-parallel engine needs at least one "
                             "engine core")
        self.cores = cores
        self.config = cores[0].config
        self.tokenizer = cores[0].tokenizer
        self.vocab_size = cores[0].vocab_size
        self.max_model_len = cores[0].max_model_len
        self.dummy_steps = dummy_steps
        self.num_dummy_steps = 0
        self._failure: BaseException | None = None
        # Tokens held per core, kept current between steps by the requests added since.
        self._loads: list[int] | None = None

    @classmethod
    def from_config(cls, config: EngineConfig) -> "DataParallelEngine":
        """Start every core's workers (one torch.distributed world for all of them) and
        build one LLMEngine per core over them."""
        model_dir = config.model.model
        model_info = read_model_info(model_dir)
        resolve_max_model_len(config, model_info)
        tokenizer = Tokenizer.from_model_dir(model_dir)
        executors = create_data_parallel_executors(config)
        try:
            cores = [LLMEngine(config, executor, model_info, tokenizer)
                     for executor in executors]
        except BaseException:
            for executor in executors:
                executor.shutdown()
            raise
        return cls(cores, dummy_steps=config.parallel.enable_expert_parallel)

    @property
    def stats(self) -> SchedulerStats:
        """Every core's counters added up (each core's step counts as one step)."""
        total = SchedulerStats()
        for core in self.cores:
            for field in dataclasses.fields(SchedulerStats):
                setattr(total, field.name,
                        getattr(total, field.name) + getattr(core.stats, field.name))
        return total

    def encode_prompt(self, prompt: PromptType, params: SamplingParams
                      ) -> tuple[str | None, list[int]]:
        """Validate and tokenize as LLMEngine.encode_prompt (every core has the same model,
        limits and KV capacity, so any core can judge for all)."""
        return self.cores[0].encode_prompt(prompt, params)

    def add_request(self, request_id: str, prompt: PromptType,
                    params: SamplingParams | None = None, *,
                    prompt_token_ids: list[int] | None = None) -> None:
        """Queue a request on the least-loaded core; raises ValueError (and queues nothing)
        as LLMEngine.add_request does, also when another core runs a request of that id."""
        check_request_id(request_id)
        if self._owner(request_id) is not None:
            raise ValueError(f"request_id={request_id!r} is already in use by an unfinished "
                             "request")
        params = SamplingParams() if params is None else params
        if prompt_token_ids is None:
            _, prompt_token_ids = self.encode_prompt(prompt, params)
        loads = self._current_loads()
        target = min(range(len(self.cores)), key=lambda i: (loads[i], i))
        self.cores[target].add_request(request_id, prompt, params,
                                       prompt_token_ids=prompt_token_ids)
        loads[target] += len(prompt_token_ids) * params.n

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request on whichever core runs it; its final output, None if unknown."""
        owner = self._owner(request_id)
        if owner is None:
            return None
        self._loads = None
        return owner.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        """Whether any core has an unfinished request or a step in flight."""
        return any(core.has_unfinished_requests() for core in self.cores)

    def step(self) -> list[RequestOutput]:
        """Send every core's steps, pad with dummy steps if the cores must stay in step, then
        collect one step from every core that has one in flight; the outputs of all.

        A failure in any core (EngineDeadError when a worker died) is raised here and by
        every later call; every core stops with it (see executor.data_parallel).
        """
        if self._failure is not None:
            raise self._failure
        self._loads = None
        outputs: list[RequestOutput] = []
        try:
            for core in self.cores:
                core.send_steps()
            if self.dummy_steps:
                depth = max(core.num_steps_in_flight for core in self.cores)
                for core in self.cores:
                    while core.num_steps_in_flight < depth:
                        core.send_dummy_step()
                        self.num_dummy_steps += 1
            for core in self.cores:
                outputs += core.collect_step()
        except BaseException as exc:
            self._failure = exc
            raise
        return outputs

    def collect_idle_steps(self) -> None:
        """Once no core has an unfinished request, wait for every core's steps in flight
        (see LLMEngine.collect_idle_steps). Only then: the cores' steps stay in step."""
        if self._failure is not None:
            raise self._failure
        if any(core.outputs.requests for core in self.cores):
            return
        try:
            for core in self.cores:
                core.collect_idle_steps()
        except BaseException as exc:
            self._failure = exc
            raise

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None,
                       timeout: float | None = None) -> list:
        """Call a worker method on every rank of every core; one reply per rank, in global
        rank order (core by core, since DP is the outermost dimension)."""
        replies = []
        for core in self.cores:
            replies += core.collective_rpc(method, args, kwargs, timeout)
        return replies

    def shutdown(self) -> None:
        """Stop every core's workers; idempotent."""
        for core in self.cores:
            core.shutdown()

    def _owner(self, request_id: str) -> LLMEngine | None:
        for core in self.cores:
            if request_id in core.outputs.requests:
                return core
        return None

    def _current_loads(self) -> list[int]:
        if self._loads is None:
            self._loads = [sum(seq.num_tokens for seq in core.scheduler.seqs.values())
                           for core in self.cores]
        return self._loads
