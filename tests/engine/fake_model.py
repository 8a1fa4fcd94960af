"""A stand-in for the Worker that keeps the engine honest without a real model.

It follows the worker contract exactly (per-request state from NewRequestData, updates
from CachedRequestData, drops on finished_req_ids), stores each computed token id in a
paged "KV cache" at the slot its block table names, and before sampling reads the whole
sequence back through the block table and checks it. The next token is a deterministic
function of what was read, so a wrong block (bad prefix reuse, a block freed while in use,
a lost preemption) changes the generated tokens or fails loudly.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import msgpack

from shardline.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from shardline.step import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from shardline.engine.llm_engine import LLMEngine
from shardline.executor.base import StepFuture
from shardline.sampling_params import SamplingParams

VOCAB = 97


def random_prompts(count: int, low: int = 1, high: int = 40, seed: int | None = None
                   ) -> list[list[int]]:
    """`count` prompts of `low` to `high` token ids of the fake vocabulary, drawn from the
    `random` module (which the tests seed) or from a generator seeded with `seed`."""
    rng = random if seed is None else random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(low, high))] for _ in range(count)]


class LetterTokenizer:
    """Token t is the letter chr(97 + t % 26); encodes only lowercase letters."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 97 for c in text]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + t % 26) for t in token_ids)


class PieceTokenizer:
    """Token t decodes to one of a few pieces of one to three letters of "abc" (or to
    nothing), so stop strings made of those letters end inside tokens and span them."""

    PIECES = ["a", "b", "c", "ab", "ba", "cab", "bb", "ca", "abc", "", "cc"]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.PIECES[t % len(self.PIECES)] for t in token_ids)


class FakeModelExecutor:
    """Computes each step when it is sent; `pipeline_depth` > 1 makes the engine keep that
    many steps in flight, as it does under pipeline parallelism. Like the model runner it
    keeps its last step's sampled tokens, for a step that went ahead of the engine (async
    scheduling) to read its requests' last token from."""

    hides_host_time = False

    def __init__(self, num_blocks: int, block_size: int, seed: int = 0,
                 pipeline_depth: int = 1) -> None:
        self.max_concurrent_steps = pipeline_depth
        self.earlier_samples: dict[str, int] = {}
        self.num_kv_blocks = num_blocks
        self.block_size = block_size
        self.cache = [[-1] * block_size for _ in range(num_blocks)]
        self.states: dict[str, dict] = {}
        self.rng = random.Random(seed)
        self.steps: list[SchedulerOutput] = []

    def execute_model(self, scheduler_output: SchedulerOutput, non_block: bool = False
                      ) -> ModelRunnerOutput | StepFuture:
        output = self._execute(scheduler_output)
        return StepFuture.completed(output) if non_block else output

    def _execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        wire = msgpack.unpackb(msgpack.packb(scheduler_output.to_dict()), strict_map_key=False)
        so = SchedulerOutput.from_dict(wire)
        self.steps.append(so)
        for req_id in so.finished_req_ids:
            self.states.pop(req_id, None)
        for new in so.new_requests:
            self.states[new.req_id] = {
                "tokens": new.prompt_token_ids + new.output_token_ids,
                "num_outputs": len(new.output_token_ids), "blocks": list(new.block_ids),
                "computed": new.num_computed_tokens,
                "params": SamplingParams.from_dict(new.sampling_params)}
        for cached in so.cached_requests:
            state = self.states[cached.req_id]
            assert state["computed"] == cached.num_computed_tokens, cached
            state["tokens"] += cached.new_token_ids
            state["num_outputs"] += len(cached.new_token_ids)
            state["blocks"] += cached.new_block_ids
        out = ModelRunnerOutput()
        for req in [*so.new_requests, *so.cached_requests]:
            state = self.states[req.req_id]
            token = self._run(state, so.num_scheduled_tokens[req.req_id],
                              self.earlier_samples.get(req.req_id))
            if token is not None:
                out.req_ids.append(req.req_id)
                out.sampled_token_ids.append(token)
                logprobs = state["params"].logprobs
                out.logprobs.append(None if logprobs is None else TokenLogprobs(
                    -0.5, list(range(logprobs)), [-1.0] * logprobs))
        if out.req_ids:
            self.earlier_samples = dict(zip(out.req_ids, out.sampled_token_ids))
        wire = msgpack.unpackb(msgpack.packb(out.to_dict()), strict_map_key=False)
        return ModelRunnerOutput.from_dict(wire)

    def _run(self, state: dict, num_tokens: int, earlier_sample: int | None) -> int | None:
        start, blocks = state["computed"], state["blocks"]
        ahead = start + num_tokens == len(state["tokens"]) + 1
        assert earlier_sample is not None or not ahead, "went ahead of a step that did not sample"
        tokens = state["tokens"] + [earlier_sample] if ahead else state["tokens"]
        assert 0 < num_tokens and start + num_tokens <= len(tokens)
        for pos in range(start, start + num_tokens):
            self.cache[blocks[pos // self.block_size]][pos % self.block_size] = tokens[pos]
        state["computed"] = start + num_tokens
        if state["computed"] < len(tokens):
            return None
        seen = [self.cache[blocks[p // self.block_size]][p % self.block_size]
                for p in range(len(tokens))]
        assert seen == tokens, "KV cache read back through the block table is wrong"
        return self._sample(seen, state["params"], state["num_outputs"] + ahead)

    def _sample(self, tokens: list[int], params: SamplingParams, index: int) -> int:
        digest = sum((i + 1) * (t + 1) for i, t in enumerate(tokens)) * 2654435761
        if params.greedy:
            return digest % VOCAB
        rng = self.rng if params.seed is None else random.Random(f"{params.seed}-{index}-{digest}")
        return rng.randrange(VOCAB)

    def shutdown(self) -> None:
        self.states.clear()


def make_engine(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 16,
                max_num_batched_tokens: int = 64, max_model_len: int = 256,
                enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                eos_token_ids: tuple[int, ...] = (), tokenizer: object | None = None,
                pipeline_depth: int = 1, async_scheduling: bool | None = None,
                max_logprobs: int = 20) -> LLMEngine:
    config = EngineConfig(
        model=ModelConfig(model="fake", max_model_len=max_model_len, max_logprobs=max_logprobs),
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                          enable_prefix_caching=enable_prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                  max_num_batched_tokens=max_num_batched_tokens,
                                  enable_chunked_prefill=enable_chunked_prefill,
                                  async_scheduling=async_scheduling),
        parallel=ParallelConfig(),
    )
    info = SimpleNamespace(vocab_size=VOCAB, max_position_embeddings=1024,
                           eos_token_ids=list(eos_token_ids))
    executor = FakeModelExecutor(num_blocks, block_size, pipeline_depth=pipeline_depth)
    return LLMEngine(config, executor, info, tokenizer or LetterTokenizer())


def run_to_the_end(engine: LLMEngine, prompts: list[list[int]],
                   params: list[SamplingParams]) -> dict:
    """Add the prompts as r0, r1, ..., step until done (at most 400 steps, then fail:
    the engine stopped making progress); the finished outputs by request id."""
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", prompt, p)
    finished = {}
    for _ in range(400):
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
        if not engine.has_unfinished_requests():
            break
    assert not engine.has_unfinished_requests(), f"no progress: {engine.stats}"
    return finished
