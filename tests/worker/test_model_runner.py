"""The model runner on a GPU: queueing a decode step never waits for the device, which is
what lets async scheduling prepare step N+1 while the GPU runs step N."""

import pytest
import torch

from shardline import LLM, SamplingParams


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_queueing_a_decode_step_never_waits_for_the_gpu(temperature, rng):
    llm = LLM("tiny-llama", device="cuda", async_scheduling=True, max_num_seqs=4)
    try:
        runner = llm.engine.executor.worker.model_runner
        queue = runner.queue_step
        checked = []

        def strict(scheduler_output):
            if set(scheduler_output.num_scheduled_tokens.values()) != {1}:
                return queue(scheduler_output)  # prefill: not what this test is about
            torch.cuda.set_sync_debug_mode("error")
            try:
                return queue(scheduler_output)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                checked.append(len(scheduler_output.num_scheduled_tokens))

        runner.queue_step = strict
        prompts = [[rng.randrange(3, 259) for _ in range(rng.randint(2, 20))] for _ in range(3)]
        params = SamplingParams(temperature=temperature, seed=rng.randrange(1000),
                                max_tokens=8, ignore_eos=True)
        outputs = llm.generate(prompts, params)
        assert all(len(o.outputs[0].token_ids) == 8 for o in outputs)
        assert checked and max(checked) == 3
    finally:
        llm.shutdown()
