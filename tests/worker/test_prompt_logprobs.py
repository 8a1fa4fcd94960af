"""Prompt logprobs in the worker: which rows of a step are scored, and their log-softmax
computed a bounded number of rows at a time, against the whole log-softmax at once."""

from __future__ import annotations

import random
import time

import pytest
import torch

from shardline.sampling_params import SamplingParams
from shardline.worker import prompt_logprobs
from shardline.worker.input_batch import RequestState, build_step_inputs
from shardline.worker.prompt_logprobs import compute_prompt_logprobs

VOCAB, HIDDEN, BLOCK = 37, 8, 4


def random_step(rng: random.Random, device: torch.device = torch.device("cpu")):
    """Requests at random points of their prompts (some decoding, some resumed with
    outputs), a random few asking for prompt logprobs; their step inputs on `device`."""
    requests, counts = [], []
    for i in range(rng.randint(1, 6)):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 20))]
        outputs = [rng.randrange(VOCAB) for _ in range(rng.choice([0, 0, 3]))]
        total = len(prompt) + len(outputs)
        computed = rng.randrange(total)
        k = rng.choice([None, 0, 2, VOCAB + 5])
        requests.append(RequestState(f"r{i}", prompt, outputs, SamplingParams(prompt_logprobs=k),
                                     list(range(-(-total // BLOCK))), computed))
        counts.append(rng.randint(1, total - computed))
    return requests, build_step_inputs(requests, counts, BLOCK, device)


def scored_rows(requests: list[RequestState], inputs) -> dict[str, tuple[RequestState, int,
                                                                        list[int]]]:
    """For each request that asks and computes a prompt token with a successor: the
    request, its first such position and the batch rows of those positions."""
    starts = inputs.meta.query_start_loc.tolist()
    expected = {}
    for row, req in enumerate(requests):
        start = req.num_computed_tokens
        end = min(start + starts[row + 1] - starts[row], len(req.prompt_token_ids) - 1)
        if req.sampling_params.prompt_logprobs is not None and start < end:
            expected[req.req_id] = (req, start, [starts[row] + p - start
                                                 for p in range(start, end)])
    return expected


def assert_scored(got, expected, full: torch.Tensor, atol: float) -> None:
    """`got` has each expected request's rows of `full` (the log-softmax of every row):
    its prompt tokens' logprobs and its k best, as values (ties may order ids apart)."""
    assert [g.req_id for g in got] == list(expected)
    for record in got:
        req, start, rows = expected[record.req_id]
        k = min(req.sampling_params.prompt_logprobs, VOCAB)
        targets = req.prompt_token_ids[start + 1:start + 1 + len(rows)]
        assert record.first_index == start + 1
        assert torch.allclose(torch.tensor(record.logprobs), full[rows, targets], atol=atol)
        values = full[rows].topk(k).values if k else torch.empty(len(rows), 0)
        assert [len(t) for t in record.top_token_ids] == [k] * len(rows)
        top = torch.tensor(record.top_logprobs).view(len(rows), k)
        assert torch.allclose(top, values, atol=atol)
        ids = torch.tensor(record.top_token_ids, dtype=torch.int64).view(len(rows), k)
        assert torch.allclose(full[rows].gather(1, ids), top, atol=atol)


@pytest.mark.parametrize("max_rows", [None, 1, 2])
def test_each_scored_prompt_token_is_the_log_softmax_of_the_row_before(rng, monkeypatch,
                                                                      max_rows):
    """With room for 3 rows of logits at a time (fewer where the warm-up compiled the LM
    head for fewer), every row is scored in chunks, and each request gets the positions
    it computed whose next token is in its prompt."""
    monkeypatch.setattr(prompt_logprobs, "CHUNK_BYTES", 4 * VOCAB * 3)
    weight = torch.randn(HIDDEN, VOCAB)
    requests, inputs = random_step(rng)
    hidden = torch.randn(inputs.input_ids.shape[0], HIDDEN)
    calls = []

    def lm_head(rows: torch.Tensor) -> torch.Tensor:
        calls.append(rows.shape[0])
        return rows @ weight
    pending = compute_prompt_logprobs(inputs, hidden, lm_head, VOCAB, max_rows)
    expected = scored_rows(requests, inputs)
    if not expected:
        assert pending is None and not calls
        return
    assert max(calls) == min(3, max_rows or 3, sum(len(r) for _, _, r in expected.values()))
    assert_scored(pending.to_host(), expected, (hidden @ weight).log_softmax(-1), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_bf16_rows_queue_without_a_wait_and_read_without_waiting_for_later_work(
        rng, monkeypatch):
    """The GPU path, which the CPU never takes: bf16 logits scored in fp32, a few rows at a
    time; queueing them waits for nothing (sync debug mode raises at any wait), their copy
    to pinned host memory is queued right behind them, so reading them waits for nothing
    queued after (a sleep kernel of about half a second), and they are the CPU's
    log-softmax of the same logits."""
    monkeypatch.setattr(prompt_logprobs, "CHUNK_BYTES", 4 * VOCAB * 3)
    cuda = torch.device("cuda")
    requests, inputs = random_step(rng, cuda)
    while not inputs.prompt_logprob_spans:
        requests, inputs = random_step(rng, cuda)
    num_rows = inputs.input_ids.shape[0]
    logits = (torch.randn(num_rows, VOCAB) * 4).to(torch.bfloat16)
    table = logits.to(cuda)
    # Each row's hidden state is its row number, which the LM head looks up: a row's
    # logits are the same in any chunk, on either device.
    hidden = torch.arange(num_rows, dtype=torch.float32, device=cuda)[:, None].repeat(1, HIDDEN)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = compute_prompt_logprobs(inputs, hidden, lambda rows: table[rows[:, 0].long()],
                                          VOCAB)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda._sleep(1_000_000_000)
    start = time.perf_counter()
    got = pending.to_host()
    waited = time.perf_counter() - start
    torch.cuda.synchronize()
    assert waited < 0.2, f"the read waited {waited:.2f} s for later work"
    assert_scored(got, scored_rows(requests, inputs), logits.float().log_softmax(-1),
                  atol=1e-5)


def test_a_rank_without_logits_runs_the_same_chunks_and_reports_nothing(rng, monkeypatch):
    """Tensor-parallel ranks other than the first get no logits from the LM head, but must
    call it as often as the first (it gathers the vocabulary's columns)."""
    monkeypatch.setattr(prompt_logprobs, "CHUNK_BYTES", 4 * VOCAB * 2)
    requests = [RequestState("a", [rng.randrange(VOCAB) for _ in range(9)], [],
                             SamplingParams(prompt_logprobs=1), [0, 1, 2], 0)]
    inputs = build_step_inputs(requests, [9], BLOCK, torch.device("cpu"))
    calls = []
    assert compute_prompt_logprobs(inputs, torch.randn(9, HIDDEN),
                                   lambda rows: calls.append(rows.shape[0]), VOCAB) is None
    assert calls == [2, 2, 2, 2]   # 8 scored positions, 2 at a time
