"""The warm-up under pipeline and sequence parallelism, run on the CPU: every rank warms up
at once (SP's all-to-alls inside the forward pair up; a later pipeline stage runs on
random activations), nothing hangs, and the layout then still gives one rank's greedy
tokens and transformers' prompt logits (gloo, fp32, through the multi-process executor).
On a GPU the same warm-up compiles the kernels; on the CPU ModelRunner.warm_up skips it,
so these workers run it themselves."""

from __future__ import annotations

from layout_parity import assert_layout_matches, random_prompts
from shardline.config import ParallelConfig
from shardline.presets import resolve_model
from shardline.worker.warmup import warm_up_prefill
from shardline.worker.worker import Worker


class CpuWarmUpWorker(Worker):
    """The model worker, whose warm-up runs on the CPU as it would on a GPU."""

    def warm_up(self) -> None:
        runner = self.model_runner
        scheduler = runner.config.scheduler
        # Buckets past 64 tokens would add seconds on the CPU, and no other path.
        runner.warm_logits_rows = warm_up_prefill(
            runner.model, min(64, scheduler.max_num_batched_tokens), scheduler.max_num_seqs,
            runner.block_size, runner.max_model_len, runner.info.vocab_size, runner.device)


def test_sp2xpp2_warmed_up_in_lockstep_still_matches_one_rank(hf_model, fresh_seed):
    """Each SP pair of a stage exchanges the dummy batches' activations inside the forward;
    the second stage's pair starts from random ones; only its SP rank 0 computes logits."""
    parallel = ParallelConfig(sequence_parallel_size=2, pipeline_parallel_size=2,
                              device="cpu", worker_cls="test_parity_warmup.CpuWarmUpWorker")
    assert_layout_matches(resolve_model("tiny-qwen2"), parallel, random_prompts(3, (3, 30)),
                          hf_model, max_tokens=6)
