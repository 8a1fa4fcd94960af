"""Decode steps replayed from captured graphs against the same worker run eagerly.

On CPU the capture is stood in for by EagerRecorder, which reruns the forward over the
same static buffers: the padding, buffer reuse and fallback logic are the same code a
CUDA graph replays. With CUDA present, the real CUDAGraph recorder runs the same tests.
"""

import pytest
import torch

from near_ties import MOE_TOP, assert_greedy_match, driver_run
from shardline.sampling_params import SamplingParams
from shardline.worker.graph_runner import DecodeGraphRunner, graph_batch_sizes
from shardline.worker.input_batch import RequestState, build_step_inputs
from worker_driver import WorkerDriver, make_worker


class EagerRecorder:
    """A replay recomputes the forward over the static buffers into one fixed output."""

    def record(self, forward):
        output = forward()
        return (lambda: output.copy_(forward())), output


def recorders():
    found = [pytest.param(EagerRecorder, id="eager-replay")]
    if torch.cuda.is_available():
        from shardline.worker.graph_runner import CudaGraphRecorder
        found.append(pytest.param(CudaGraphRecorder, id="cuda-graph"))
    return found


@pytest.mark.parametrize("max_num_seqs", [1, 5, 16, 64, 100, 1000])
def test_batch_sizes_cover_every_batch_up_to_the_cap(max_num_seqs):
    sizes = graph_batch_sizes(max_num_seqs)
    top = min(max_num_seqs, 256)
    assert sizes == sorted(set(sizes)) and sizes[0] == 1 and sizes[-1] == top
    assert all(b - a <= 16 for a, b in zip(sizes, sizes[1:]))


def _kv_caches(worker) -> list[torch.Tensor]:
    layers = worker.model_runner.model.attention_layers()
    return [t.clone() for a in layers for t in (a.k_cache, a.v_cache)]


@pytest.mark.parametrize("recorder", recorders())
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-mixtral"])
def test_graph_decode_gives_the_eager_tokens_and_cache(model, recorder, monkeypatch,
                                                       fresh_seed):
    eager, graphed = make_worker(model), make_worker(model)
    runner = graphed.model_runner
    before = _kv_caches(graphed)
    runner.decode_graphs = DecodeGraphRunner(runner.model, [1, 2, 4], max_blocks_per_seq=64,
                                             block_size=4, device=runner.device)
    runner.decode_graphs.capture(recorder(), tuning_context=100, vocab_size=3)
    assert all(torch.equal(a, b) for a, b in zip(before, _kv_caches(graphed))), \
        "capturing wrote to the KV cache"

    replayed = []
    run = runner.decode_graphs.run
    monkeypatch.setattr(runner.decode_graphs, "run",
                        lambda inputs: replayed.append(inputs.input_ids.shape[0]) or run(inputs))
    lengths = torch.randint(3, 40, (6,)).tolist()
    prompts = [torch.randint(3, 259, (n,)).tolist() for n in lengths]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, logprobs=MOE_TOP)
              for m in (2, 3, 5, 7, 9, 12)]
    expected = WorkerDriver(eager).generate(prompts, params, token_budget=1000)
    got = WorkerDriver(graphed).generate(prompts, params, token_budget=1000)

    assert sorted(set(replayed)) == [1, 2, 3, 4], "batches of 1-4 should replay, 5-6 not"
    if got[0] != expected[0]:
        # Padded batches round differently: a near tie flipped (tests/near_ties.py), and
        # the caches differ from that token on.
        assert_greedy_match(driver_run(*expected), driver_run(*got), moe=model == "tiny-mixtral")
        return
    for want, have in zip(_kv_caches(eager), _kv_caches(graphed)):
        torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-5)


def _decoding(n: int) -> list[RequestState]:
    """n requests about to decode, request i in blocks 3i..3i+2 (block size 4)."""
    states = []
    for i in range(n):
        prompt = torch.randint(3, 259, (int(torch.randint(1, 12, (1,))),)).tolist()
        states.append(RequestState(f"r{i}", prompt, [], SamplingParams(),
                                   [3 * i, 3 * i + 1, 3 * i + 2], len(prompt) - 1))
    return states


def test_padding_rows_write_no_kv_and_stale_rows_are_cleared(fresh_seed, caplog):
    runner = make_worker("tiny-llama").model_runner
    graphs = DecodeGraphRunner(runner.model, [4], max_blocks_per_seq=8, block_size=4,
                               device=runner.device)
    with caplog.at_level("INFO", logger="shardline"):
        graphs.capture(EagerRecorder(), tuning_context=32, vocab_size=300)
    assert "decode graphs: 1 batch sizes captured in" in caplog.text   # startup's timeline
    states = _decoding(4)
    graphs.run(build_step_inputs(states, [1] * 4, 4, runner.device))
    attn = runner.model.attention_layers()[0]
    attn.k_cache.zero_()

    inputs = build_step_inputs(states[:3], [1] * 3, 4, runner.device)
    hidden = graphs.run(inputs)
    rows = attn.k_cache.flatten(0, 1).flatten(1)
    written = set(torch.nonzero(rows.abs().sum(-1)).flatten().tolist())
    assert written == set(inputs.meta.slot_mapping.tolist())
    with torch.inference_mode():
        expected = runner.model(inputs.input_ids, inputs.positions, inputs.meta)
    torch.testing.assert_close(hidden, expected)


def test_steps_a_graph_cannot_take_run_eagerly(monkeypatch, fresh_seed):
    eager, worker = make_worker("tiny-llama"), make_worker("tiny-llama")
    runner = worker.model_runner
    runner.decode_graphs = DecodeGraphRunner(runner.model, [1, 2], max_blocks_per_seq=2,
                                             block_size=4, device=runner.device)
    runner.decode_graphs.capture(EagerRecorder(), tuning_context=8, vocab_size=300)
    monkeypatch.setattr(runner.decode_graphs, "run",
                        lambda inputs: pytest.fail("a step beyond the graphs replayed"))
    greedy = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    wide = [torch.randint(3, 259, (5,)).tolist() for _ in range(3)]   # 3 rows > 2
    long_prompt = [torch.randint(3, 259, (8,)).tolist()]   # block size 4: 3rd block at decode
    for prompts in (wide, long_prompt):
        expected, _ = WorkerDriver(eager).generate(prompts, greedy)
        got, _ = WorkerDriver(worker).generate(prompts, greedy)
        assert got == expected and all(len(tokens) == 3 for tokens in got)


@pytest.mark.parametrize("context", [0, 9])
def test_tuning_context_must_fit_a_block_table_row(context):
    runner = make_worker("tiny-llama").model_runner
    graphs = DecodeGraphRunner(runner.model, [1], max_blocks_per_seq=2, block_size=4,
                               device=runner.device)
    with pytest.raises(ValueError, match=f"tuning_context={context} must be in \\[1, 8\\]"):
        graphs.capture(EagerRecorder(), tuning_context=context, vocab_size=300)


@pytest.mark.parametrize("sizes, blocks", [([], 4), ([0, 2], 4), ([1, 2], 0)])
def test_bad_runner_arguments_are_named(sizes, blocks):
    with pytest.raises(ValueError, match="batch_sizes|max_blocks_per_seq"):
        DecodeGraphRunner(torch.nn.Identity(), sizes, blocks, 4, torch.device("cpu"))
