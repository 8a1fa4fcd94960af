"""Startup warm-up: one throwaway forward per shape bucket, the KV cache left as it was,
and the runner's choice of what to warm up on which device."""

import contextlib

import pytest
import torch

from shardline.kernels import dispatch
from shardline.kernels._tuned import shape_bucket
from shardline.worker import model_runner, warmup
from shardline.worker.warmup import token_buckets, warm_up_prefill
from worker_driver import make_worker


@pytest.mark.parametrize("limit", [1, 2, 7, 9, 16, 64, 2048, 3000])
def test_token_buckets_reach_every_kernel_bucket(limit):
    counts = token_buckets(limit)
    assert counts[-1] == limit and counts == sorted(set(counts))
    assert {shape_bucket(n) for n in counts} == {shape_bucket(n) for n in range(1, limit + 1)}
    # triton compiles separately for a size of 1, a multiple of 16 and any other size
    assert counts[0] == 1 and (limit < 3 or any(n % 16 and n > 1 for n in counts))
    assert len(counts) <= 3 + max(0, (limit - 1).bit_length() - 4)


@pytest.mark.parametrize("model, ahead", [("tiny-llama", False), ("tiny-mixtral", False),
                                          ("tiny-llama", True)])
def test_warm_up_runs_every_bucket_and_leaves_the_cache_untouched(model, ahead, monkeypatch):
    """Where kernels can compile ahead (CUDA), a first pass inside compile_ahead only
    compiles; the buckets then run again."""
    passes = []

    @contextlib.contextmanager
    def compile_ahead(device):
        passes.append(len(forwards))
        yield ahead
        passes.append(len(forwards))
    monkeypatch.setattr(warmup, "compile_ahead", compile_ahead)
    runner = make_worker(model).model_runner
    layers = runner.model.attention_layers()
    for attn in layers:
        attn.k_cache.normal_()
        attn.v_cache.normal_()
    before = [t.clone() for a in layers for t in (a.k_cache, a.v_cache)]
    forwards, logits = [], []
    forward, compute_logits = runner.model.forward, runner.model.compute_logits
    monkeypatch.setattr(runner.model, "forward",
                        lambda ids, positions, meta, intermediate: forwards.append(
                            (ids.shape[0], int(meta.seq_lens[0]), meta.block_tables.shape[1]))
                        or forward(ids, positions, meta, intermediate))
    monkeypatch.setattr(runner.model, "compute_logits",
                        lambda h: logits.append(h.shape[0]) or compute_logits(h))
    max_position = int(torch.randint(300, 513, ()))    # tiny's rotary holds 512
    monkeypatch.setattr(warmup, "TUNING_CONTEXT", int(torch.randint(257, 300, ())))
    warmed = warm_up_prefill(runner.model, max_num_batched_tokens=50, max_num_seqs=5,
                             block_size=4, max_position=max_position,
                             vocab_size=runner.info.vocab_size, device=runner.device)
    runs = 2 if ahead else 1
    # Two decodes first, each of a context worth timing attention on: one attention reads
    # in a single split, one through a block table as wide as the longest context (the
    # split path); then a prefill of each bucket.
    tuning = min(max_position, warmup.TUNING_CONTEXT)
    decodes = [(1, 256, 64), (1, tuning, -(-max_position // 4))]
    prefills = [(8, 8, 2), (16, 16, 4), (32, 32, 8), (50, 50, 13)]
    assert forwards == (decodes + prefills) * runs
    assert logits == [1, 5] * runs
    assert warmed == 5
    assert passes == [0, 6 if ahead else 0]
    from shardline.kernels.attention_decode import choose_splits
    assert choose_splits(1, 1, warmup.UNSPLIT_CONTEXT, num_sms=10**6) == 1
    assert choose_splits(1, 1, warmup.UNSPLIT_CONTEXT + 1, num_sms=10**6) > 1
    after = [t for a in layers for t in (a.k_cache, a.v_cache)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("layers", ["first", "middle", "last"])
def test_a_pipeline_stage_warms_up_alone_on_random_activations(layers, monkeypatch):
    """Stages after the first get random [tokens, hidden] activations in place of their
    neighbour's; only the last computes logits."""
    from shardline.models.llama import LlamaForCausalLM
    runner = make_worker("tiny-llama").model_runner   # the process's parallel state
    config = {**runner.model.config, "num_hidden_layers": 4}
    span = {"first": range(0, 2), "middle": range(1, 3), "last": range(2, 4)}[layers]
    stage = LlamaForCausalLM(config, torch.float32, 64, layers=span)
    for param in stage.parameters():
        param.data.normal_(0, 0.05)
    for attn, full in zip(stage.attention_layers(), runner.model.attention_layers()):
        attn.k_cache, attn.v_cache = full.k_cache, full.v_cache
    seen, logits = [], []
    forward, compute_logits = stage.forward, stage.compute_logits

    def spy(ids, positions, meta, intermediate=None):
        seen.append(None if intermediate is None else
                    [tuple(t.shape) for t in intermediate])
        return forward(ids, positions, meta, intermediate)
    monkeypatch.setattr(stage, "forward", spy)
    monkeypatch.setattr(stage, "compute_logits", lambda h: logits.append(h.shape[0])
                        or compute_logits(h))
    warm_up_prefill(stage, max_num_batched_tokens=20, max_num_seqs=3, block_size=4,
                    max_position=64, vocab_size=runner.info.vocab_size, device=runner.device)
    hidden = config["hidden_size"]
    expected = [None if layers == "first" else [(n, hidden)] * 2 for n in (1, 1, 8, 16, 20)]
    assert seen == expected
    assert logits == ([1, 3] if layers == "last" else [])


def _spy_on_warm_up(monkeypatch, runner):
    calls = []
    monkeypatch.setattr(model_runner, "warm_up_prefill",
                        lambda *a: calls.append("tune") or len(calls) + 6)
    monkeypatch.setattr(model_runner, "CudaGraphRecorder", lambda: "recorder")
    monkeypatch.setattr(runner, "capture_decode_graphs", lambda rec: calls.append(rec))
    return calls


@pytest.mark.parametrize("eager, triton_off, expected", [
    (False, False, ["tune", "recorder"]),
    (True, False, ["tune"]),
    (False, True, ["recorder"]),
])
def test_warm_up_on_cuda_tunes_triton_and_captures_unless_eager(eager, triton_off, expected,
                                                                 monkeypatch):
    runner = make_worker("tiny-llama").model_runner
    calls = _spy_on_warm_up(monkeypatch, runner)
    runner.config.model.enforce_eager = eager
    if triton_off:
        monkeypatch.setenv("SHARDLINE_DISABLE_TRITON", "1")
        dispatch.reset_triton_choice()
    monkeypatch.setattr(runner, "device", torch.device("cuda"))
    # The CPU build cannot make a GPU current: the warm-up runs under a stand-in.
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    runner.warm_up()
    assert calls == expected
    # Prompt logprobs then score at most the rows the warm-up compiled the LM head for.
    assert runner.warm_logits_rows == (None if triton_off else 7)


@pytest.mark.parametrize("group", ["get_pp_group", "get_sp_group"])
def test_warm_up_on_cuda_under_pipeline_or_sequence_parallelism_captures_no_graph(
        group, monkeypatch):
    from types import SimpleNamespace
    runner = make_worker("tiny-llama").model_runner
    calls = _spy_on_warm_up(monkeypatch, runner)
    monkeypatch.setattr(model_runner, group, lambda: SimpleNamespace(size=2))
    monkeypatch.setattr(runner, "device", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    runner.warm_up()
    assert calls == ["tune"]


def test_warm_up_on_cpu_does_nothing(monkeypatch):
    runner = make_worker("tiny-llama").model_runner
    calls = _spy_on_warm_up(monkeypatch, runner)
    runner.warm_up()
    assert calls == [] and runner.decode_graphs is None and runner.warm_logits_rows is None


@pytest.mark.timeout(600)
def test_serving_after_the_warm_up_compiles_no_kernel(tmp_path):
    """bench/serving_compiles.py: every Triton kernel specialization that a few kinds of
    requests launch (short, mixed, split decode contexts, chunked, cached prefix, prompt
    logprobs) was compiled by the warm-up, with and without decode graphs, dense and MoE.
    Compiled Triton only (no interpreter), launches recorded, as on an H100."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    bench = Path(__file__).resolve().parents[2] / "bench"
    out = tmp_path / "serving_compiles.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(bench / "serving_compiles.py"), "--models",
                           "tiny-llama", "tiny-mixtral", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [(run["model"], run["mode"]) for run in report["runs"]] == [
        (model, mode) for model in ("tiny-llama", "tiny-mixtral") for mode in ("graphs", "eager")]
    for run in report["runs"]:
        assert run["warm_up"] > 0 and len(run["phases"]) == 7
        assert [p["compiles"] for p in run["phases"]] == [[]] * 7, done.stdout
    assert report["total_new_compiles"] == 0
