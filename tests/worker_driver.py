"""A minimal scheduler for tests: drives a Worker with hand-built SchedulerOutputs.

Decodes go first, then prefill chunks under a per-step token budget; blocks come from a
simple free list. Tokens the worker samples are sent back in the next step, as the
engine does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shardline.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from shardline.step import NewRequestData, SchedulerOutput
from shardline.sampling_params import SamplingParams
from shardline.worker.worker import Worker


def make_worker(model: str, block_size: int = 4, num_blocks: int = 256,
                dtype: str = "float32", seed: int = 0) -> Worker:
    config = EngineConfig(ModelConfig(model, dtype=dtype, seed=seed),
                          CacheConfig(block_size=block_size, num_blocks=num_blocks),
                          SchedulerConfig(), ParallelConfig())
    worker = Worker(config)
    worker.init_device()
    worker.load_model()
    worker.initialize_cache(worker.determine_num_kv_blocks())
    return worker


@dataclass
class _Req:
    req_id: str
    prompt: list[int]
    params: SamplingParams
    outputs: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    computed: int = 0
    sent_tokens: int = -1   # tokens the worker knows; -1: not sent yet
    sent_blocks: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.outputs


class WorkerDriver:
    def __init__(self, worker: Worker):
        self.worker = worker
        self.block_size = worker.config.cache.block_size
        self.free = list(range(worker.determine_num_kv_blocks()))

    def _schedule(self, reqs: list[_Req], budget: int, finished: list[str]) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=finished)
        decodes = [r for r in reqs if r.computed == len(r.tokens) - 1 and r.sent_tokens >= 0]
        prefills = [r for r in reqs if r not in decodes]
        for r in decodes + prefills:
            n = min(len(r.tokens) - r.computed, budget)
            if n <= 0:
                continue
            budget -= n
            need = -(-(r.computed + n) // self.block_size)
            while len(r.blocks) < need:
                r.blocks.append(self.free.pop(0))
            out.num_scheduled_tokens[r.req_id] = n
            if r.sent_tokens < 0:
                out.new_requests.append(NewRequestData(
                    r.req_id, list(r.prompt), list(r.outputs), r.params.to_dict(),
                    list(r.blocks), r.computed))
            else:
                out.cached_requests.append(r.req_id, r.tokens[r.sent_tokens:],
                                           r.blocks[r.sent_blocks:], r.computed)
            r.sent_tokens, r.sent_blocks = len(r.tokens), len(r.blocks)
        return out

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 token_budget: int = 64) -> tuple[list[list[int]], list[list]]:
        """Outputs (and per-token logprobs) of each prompt, max_tokens each."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        reqs = [_Req(f"r{i}", list(p), sp) for i, (p, sp) in enumerate(zip(prompts, params))]
        logprobs: dict[str, list] = {r.req_id: [] for r in reqs}
        active, finished = list(reqs), []
        while active:
            so = self._schedule(active, token_budget, finished)
            finished = []
            result = self.worker.execute_model(so)
            for n in so.num_scheduled_tokens:
                req = next(r for r in active if r.req_id == n)
                req.computed += so.num_scheduled_tokens[n]
            for req_id, token, lp in zip(result.req_ids, result.sampled_token_ids,
                                         result.logprobs):
                req = next(r for r in active if r.req_id == req_id)
                req.outputs.append(token)
                logprobs[req_id].append(lp)
                if len(req.outputs) == req.params.max_tokens:
                    active.remove(req)
                    finished.append(req_id)
                    self.free.extend(req.blocks)
        return [r.outputs for r in reqs], [logprobs[r.req_id] for r in reqs]

    def forced_logits(self, prompts: list[list[int]], prefill: int) -> list[torch.Tensor]:
        """Logits at every prompt position, as prompt_logits gives them, but only the first
        `prefill` tokens of each prompt go in one prefill step: the rest follow one token
        per decode step (teacher forcing), so the decode path computes their logits."""
        reqs = [_Req(f"f{i}", list(p[:prefill]), SamplingParams()) for i, p in enumerate(prompts)]
        pieces: dict[str, list[torch.Tensor]] = {r.req_id: [] for r in reqs}
        active = reqs
        while active:
            so = self._schedule(active, sum(len(r.tokens) - r.computed for r in active), [])
            for req_id, logits in self.worker.model_runner.score(so).items():
                pieces[req_id].append(logits)
            for r in active:
                r.computed = len(r.tokens)
            active = [r for r, p in zip(reqs, prompts) if len(r.tokens) < len(p)]
            for r in active:
                r.outputs.append(prompts[reqs.index(r)][len(r.tokens)])
        self.worker.execute_model(SchedulerOutput(finished_req_ids=[r.req_id for r in reqs]))
        for r in reqs:
            self.free.extend(r.blocks)
        return [torch.cat(pieces[r.req_id]) for r in reqs]

    def prompt_logits(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Logits at every prompt position, all prompts in one step."""
        reqs = [_Req(f"s{i}", list(p), SamplingParams()) for i, p in enumerate(prompts)]
        so = self._schedule(reqs, sum(len(p) for p in prompts), [])
        logits = self.worker.model_runner.score(so)
        done = SchedulerOutput(finished_req_ids=[r.req_id for r in reqs])
        self.worker.execute_model(done)
        for r in reqs:
            self.free.extend(r.blocks)
        return [logits[r.req_id] for r in reqs]
