"""One rank's model execution: request state, KV cache, forward pass and sampling.

Each step, all scheduled tokens of all requests run through the model in one flat
batch; logits are computed only where a request samples its next token, and at the
prompt tokens of requests that ask for prompt logprobs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

from shardline.config import EngineConfig
from shardline.step import ModelRunnerOutput, SchedulerOutput
from shardline.kernels._tuned import autotuning_allowed, set_autotuning
from shardline.kernels.dispatch import triton_enabled
from shardline.layers.attention import AttentionMetadata
from shardline.layers.sampler import Sampler, SamplingBatch
from shardline.layers.token_sets import BlockedTokens
from shardline.distributed.parallel_state import get_pp_group, get_sp_group, get_tp_group
from shardline.layers.sequence_parallel import local_num_tokens
from shardline.models.llama import IntermediateTensors
from shardline.models.loader import load_model, read_config, read_model_info
from shardline.models.partition import stage_layer_range
from shardline.presets import resolve_model
from shardline.worker.graph_runner import (CudaGraphRecorder, DecodeGraphRunner, GraphRecorder,
                                           graph_batch_sizes)
from shardline.worker.input_batch import (RequestState, StepInputs, build_step_inputs,
                                          fill_ahead_tokens)
from shardline.worker.kv_memory import allocate_kv_cache
from shardline.worker.prompt_logprobs import compute_prompt_logprobs
from shardline.worker.warmup import TUNING_CONTEXT, warm_up_prefill

_SEED_MIX, _INDEX_MIX = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9  # odd 64-bit mixing constants


Method = TypeVar("Method", bound=Callable)


def on_device(method: Method) -> Method:
    """Run a ModelRunner method with the runner's GPU as the current CUDA device.

    The current device is per thread, and the thread that set it (Worker.init_device) is
    not always the one that steps: AsyncLLM steps its in-process worker on a thread of its
    own, where GPU 0 is current. A worker on another GPU then launched its Triton kernels,
    recorded the events that say its outputs reached the host and captured its graphs on
    GPU 0's streams, whatever tensors they used."""
    @functools.wraps(method)
    def guarded(self: "ModelRunner", *args, **kwargs):
        if self.device.type != "cuda":
            return method(self, *args, **kwargs)
        with torch.cuda.device(self.device):
            return method(self, *args, **kwargs)
    return guarded


def sampling_seed(seed: int, output_index: int) -> int:
    """Seed of the draw for output token `output_index` of a request seeded with `seed`:
    independent of batch mates and unchanged by preemption. Seeds that torch's generators
    tell apart (equal mod 2**64 is equal there too) give different draws."""
    return ((seed * _SEED_MIX) ^ ((output_index + 1) * _INDEX_MIX)) % (1 << 64)


class ModelRunner:
    """One rank's model, KV cache and sampler, and the per-request state that drives them."""

    def __init__(self, config: EngineConfig, device: torch.device):
        self.config = config
        self.device = device
        self.model_dir = resolve_model(config.model.model)
        # Eager mode starts in seconds: it never times the candidate configs of a kernel
        # shape the tuned table lacks, even where SHARDLINE_AUTOTUNE=1 asks for it. An
        # invalid SHARDLINE_AUTOTUNE is refused here, on any device.
        set_autotuning(not config.model.enforce_eager)
        autotuning_allowed()
        self.info = read_model_info(self.model_dir)
        self._eos_token_ids = [t for t in self.info.eos_token_ids
                               if 0 <= t < self.info.vocab_size]
        checkpoint = read_config(self.model_dir)
        self.dtype = config.model.resolve_torch_dtype(
            device.type, checkpoint.get("torch_dtype") or checkpoint.get("dtype"))
        self.block_size = config.cache.block_size
        self.max_model_len = config.model.max_model_len or self.info.max_position_embeddings
        self.requests: dict[str, RequestState] = {}
        self.sampler = Sampler()
        self.generator = torch.Generator(device).manual_seed(config.model.seed)
        self.model: torch.nn.Module | None = None
        self.decode_graphs: DecodeGraphRunner | None = None
        # The most rows the warm-up ran the LM head on (None: nothing warmed): prompt
        # logprobs score at most that many at a time, so no chunk compiles a kernel mid-run.
        self.warm_logits_rows: int | None = None
        self._dummy: tuple[torch.Tensor, torch.Tensor, AttentionMetadata] | None = None
        # The last step that sampled: its requests and tokens (still on the device), which
        # a step sent ahead of the engine's view reads its requests' last tokens from.
        self._earlier_samples: list[str] = []
        self._earlier_tokens: torch.Tensor | None = None

    @on_device
    def load_model(self) -> None:
        """Load this rank's slice of the weights, for its pipeline stage's layers only. The
        rotary table covers max_model_len positions, which no sequence passes (the engine
        refuses a max_model_len beyond the model's max_position_embeddings)."""
        pp = get_pp_group()
        layers = stage_layer_range(self.info.num_hidden_layers, pp.size, pp.rank,
                                   self.config.parallel.pipeline_stage_layers)
        self.model = load_model(self.model_dir, self.dtype, self.device, self.max_model_len,
                                layers)

    def kv_block_bytes(self) -> int:
        """Bytes of one KV block over all layers of this rank (K and V)."""
        layers = self.model.attention_layers()
        per_layer = sum(2 * self.block_size * a.num_kv_heads * a.head_dim for a in layers)
        return per_layer * torch.empty(0, dtype=self.dtype).element_size()

    @on_device
    def initialize_cache(self, num_blocks: int) -> None:
        for attn in self.model.attention_layers():
            shape = (num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
            attn.k_cache = allocate_kv_cache(shape, self.dtype, self.device)
            attn.v_cache = allocate_kv_cache(shape, self.dtype, self.device)

    @on_device
    def warm_up(self) -> None:
        """On CUDA: compile the Triton kernels for every prefill and logits shape bucket,
        then (unless enforce_eager) capture the decode graphs. Nothing to do on CPU.

        Every rank of the engine warms up at once, the same batches in the same order, so
        the collectives inside a forward (TP's all-reduces, SP's all-to-alls) pair up; a
        pipeline stage after the first runs on random activations (warmup.stage_input).
        Pipeline and sequence parallelism decode eagerly: no graphs are captured for them."""
        if self.device.type != "cuda":
            return
        if triton_enabled(self.device):
            scheduler = self.config.scheduler
            self.warm_logits_rows = warm_up_prefill(
                self.model, scheduler.max_num_batched_tokens, scheduler.max_num_seqs,
                self.block_size, self.max_model_len, self.info.vocab_size, self.device)
        # Expert parallelism sizes its token transfers on the host every step: no graphs.
        if not (self.config.model.enforce_eager or self.config.parallel.enable_expert_parallel
                or get_pp_group().size > 1 or get_sp_group().size > 1):
            self.capture_decode_graphs(CudaGraphRecorder())

    @torch.inference_mode()
    def capture_decode_graphs(self, recorder: GraphRecorder) -> None:
        """Record the decode forward for every batch-size bucket up to max_num_seqs."""
        runner = DecodeGraphRunner(
            self.model, graph_batch_sizes(self.config.scheduler.max_num_seqs),
            max_blocks_per_seq=-(-self.max_model_len // self.block_size),
            block_size=self.block_size, device=self.device)
        runner.capture(recorder, tuning_context=min(self.max_model_len, TUNING_CONTEXT),
                       vocab_size=self.info.vocab_size)
        self.decode_graphs = runner

    def update_states(self, scheduler_output: SchedulerOutput) -> list[RequestState]:
        """Apply the step's request changes; return the scheduled requests in order."""
        for req_id in scheduler_output.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in scheduler_output.new_requests:
            self.requests[new.req_id] = RequestState.from_new(new, self._eos_token_ids)
        cached = scheduler_output.cached_requests
        try:
            states = list(map(self.requests.__getitem__, cached.req_ids))
        except KeyError as exc:
            raise KeyError(f"cached request {exc.args[0]!r} is unknown to this worker") from None
        for state, new_token_ids, num_computed in zip(states, cached.token_runs(),
                                                      cached.num_computed_tokens):
            state.output_token_ids += new_token_ids
            state.num_computed_tokens = num_computed
        for position, new_block_ids in cached.new_block_ids:
            states[position].block_ids += new_block_ids
        scheduled = scheduler_output.num_scheduled_tokens
        return [self.requests[r] for r in scheduler_output.req_ids if scheduled.get(r, 0) > 0]

    def _forward(self, scheduler_output: SchedulerOutput
                 ) -> tuple[StepInputs, torch.Tensor | None]:
        """Run this rank's part of the step. Returns the final hidden states on the last
        pipeline stage; an earlier stage sends its activations on and returns None."""
        scheduled = self.update_states(scheduler_output)
        counts = [scheduler_output.num_scheduled_tokens[r.req_id] for r in scheduled]
        inputs = build_step_inputs(scheduled, counts, self.block_size, self.device,
                                   self._earlier_samples)
        if inputs.ahead_req_ids:
            fill_ahead_tokens(inputs, self._earlier_step_tokens())
        if self.decode_graphs is not None and self.decode_graphs.supports(inputs):
            return inputs, self.decode_graphs.run(inputs)
        return inputs, self._run_stage(inputs.input_ids, inputs.positions, inputs.meta)

    def _earlier_step_tokens(self) -> torch.Tensor:
        """The tokens of the last step that sampled, for a step gone ahead of them. Only the
        first tensor-parallel rank samples: it broadcasts them to the others, which need
        the tokens for their slice of the embedding (every rank reaches this call, since
        every rank sees the same steps)."""
        tokens = self._earlier_tokens
        tp = get_tp_group()
        if tp.size == 1:
            return tokens
        if tokens is None:
            tokens = torch.empty(len(self._earlier_samples), dtype=torch.int64,
                                 device=self.device)
        return tp.broadcast(tokens, src=0)

    def _dummy_inputs(self) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Token 0 at position 0 as a one-token prefill that writes no KV (slot -1) and
        reads block 0: a dummy step's batch, built once."""
        if self._dummy is None:
            zeros = torch.zeros(1, dtype=torch.int64, device=self.device)
            self._dummy = (zeros, zeros, AttentionMetadata(
                slot_mapping=torch.full((1,), -1, dtype=torch.int64, device=self.device),
                query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device=self.device),
                seq_lens=torch.ones(1, dtype=torch.int32, device=self.device),
                block_tables=torch.zeros(1, 1, dtype=torch.int32, device=self.device),
                decode_only=True))
        return self._dummy

    def _run_stage(self, input_ids: torch.Tensor, positions: torch.Tensor,
                   meta: AttentionMetadata) -> torch.Tensor | None:
        """This rank's pipeline stage on one batch: the final hidden states on the last
        stage; an earlier stage sends its activations on and returns None."""
        pp = get_pp_group()
        intermediate = None
        if not self.model.is_first_stage:
            shape = (local_num_tokens(input_ids.shape[0]), self.info.hidden_size)
            intermediate = IntermediateTensors(*pp.recv_from_prev([shape, shape], self.dtype))
        out = self.model(input_ids, positions, meta, intermediate)
        if not self.model.is_last_stage:
            pp.send_to_next(list(out))
            return None
        return out

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and sample (see queue_step); wait for its tokens."""
        return self.queue_step(scheduler_output)()

    @on_device
    @torch.inference_mode()
    def queue_step(self, scheduler_output: SchedulerOutput
                   ) -> Callable[[], ModelRunnerOutput]:
        """Queue one step's forward and sampling on the device and return the call that
        reads its tokens back: on a GPU the host is free until then (to prepare the next
        step under async scheduling).

        An empty step is a dummy step: the engine sends one to a data-parallel core with
        nothing to do while the other cores run a step, so that collectives spanning the
        cores (expert parallelism's all-to-all in every MoE layer) stay in step; it runs a
        one-token forward that writes no KV and samples nothing."""
        if scheduler_output.is_empty:
            self.update_states(scheduler_output)
            self._run_stage(*self._dummy_inputs())
            return ModelRunnerOutput
        inputs, hidden = self._forward(scheduler_output)
        if hidden is None:
            return ModelRunnerOutput
        prompt = compute_prompt_logprobs(inputs, hidden, self.model.compute_logits,
                                         self.info.vocab_size, self.warm_logits_rows)
        if not inputs.sample_req_ids:
            if prompt is None:
                return ModelRunnerOutput
            return lambda: ModelRunnerOutput(prompt_logprobs=prompt.to_host())
        req_ids = self._earlier_samples = inputs.sample_req_ids
        self._earlier_tokens = None
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        if logits is None:
            return ModelRunnerOutput  # another TP rank gathered the logits and samples
        batch = self._sampling_batch(inputs.sample_req_ids, inputs.ahead_req_ids)
        # The LM head made these logits for this call alone (nothing reads them after; the
        # prompt logprobs have their own): the sampler writes its masks into them.
        sampled = self.sampler(logits, batch, overwrite=True)
        self._earlier_tokens = sampled.token_ids

        def read() -> ModelRunnerOutput:
            tokens, logprobs = sampled.to_host()
            return ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=tokens,
                                     logprobs=logprobs,
                                     prompt_logprobs=[] if prompt is None else prompt.to_host())
        return read

    @on_device
    @torch.inference_mode()
    def score(self, scheduler_output: SchedulerOutput) -> dict[str, torch.Tensor]:
        """Run the step like execute_model, but return the logits of every scheduled token
        per request (for parity checks and prompt scoring) instead of sampling."""
        inputs, hidden = self._forward(scheduler_output)
        logits = None if hidden is None else self.model.compute_logits(hidden)
        if logits is None:
            return {}  # only the output rank (first TP rank of the last stage) has logits
        logits = logits.float().cpu()
        starts = inputs.meta.query_start_loc.tolist()
        return {r: logits[starts[i]:starts[i + 1]] for i, r in enumerate(inputs.req_ids)}

    def _sampling_batch(self, req_ids: list[str], ahead_req_ids: list[str]) -> SamplingBatch:
        """The batch's sampling settings. A request that went ahead has one output token
        more than this worker has been sent: its draw is for the output after that one.
        A request short of min_tokens may not sample a token that would stop it."""
        states = [self.requests[r] for r in req_ids]
        ahead = set(ahead_req_ids)
        generators, blocked, token_bias = [], [], []
        for state in states:
            is_ahead = state.req_id in ahead
            params = state.sampling_params
            if is_ahead and params.needs_token_history:
                raise RuntimeError(f"request {state.req_id!r} went ahead of the engine, but its "
                                   "penalties need every earlier output token")
            index = len(state.output_token_ids) + is_ahead
            if params.seed is None:
                generators.append(self.generator)
            else:
                generators.append(torch.Generator(self.device).manual_seed(
                    sampling_seed(params.seed, index)))
            if index < params.min_tokens:
                blocked.append(state.stop_ids)
            else:
                blocked.append([])
                if len(state.stop_ids):
                    # No later step masks them (a request's index only grows; a resumed
                    # one gets a new state): its ids and their vocabulary mask go now.
                    state.stop_ids = BlockedTokens(())
            token_bias.append(state.token_bias)
        return SamplingBatch(params=[s.sampling_params for s in states],
                             prompt_token_ids=[s.prompt_token_ids for s in states],
                             output_token_ids=[s.output_token_ids for s in states],
                             generators=generators, blocked_token_ids=blocked,
                             token_bias=token_bias)
