import pytest
import torch

from shardline.sampling_params import SamplingParams
from shardline.worker.input_batch import RequestState, build_step_inputs, fill_ahead_tokens


def _state(req_id, prompt_len, outputs, blocks, computed):
    prompt = torch.randint(3, 259, (prompt_len,)).tolist()
    return RequestState(req_id, prompt, outputs, SamplingParams(), blocks, computed)


def test_flat_batch_layout_for_chunk_and_decode():
    chunk = _state("a", 10, [], [5, 2, 9], 4)        # tokens 4..9 of the prompt
    decode = _state("b", 3, [40, 41], [7, 1], 4)      # last output token at position 4
    inputs = build_step_inputs([chunk, decode], [6, 1], 4, torch.device("cpu"))
    assert inputs.input_ids.tolist() == chunk.prompt_token_ids[4:10] + [41]
    assert inputs.positions.tolist() == [4, 5, 6, 7, 8, 9, 4]
    expected_slots = [2 * 4 + 0, 2 * 4 + 1, 2 * 4 + 2, 2 * 4 + 3, 9 * 4 + 0, 9 * 4 + 1, 1 * 4 + 0]
    assert inputs.meta.slot_mapping.tolist() == expected_slots
    assert inputs.meta.query_start_loc.tolist() == [0, 6, 7]
    assert inputs.meta.seq_lens.tolist() == [10, 5]
    assert inputs.meta.block_tables.tolist() == [[5, 2, 9], [7, 1, 0]]
    assert not inputs.meta.decode_only
    assert inputs.sample_req_ids == ["a", "b"] and inputs.logits_indices.tolist() == [5, 6]
    int32 = (inputs.meta.query_start_loc, inputs.meta.seq_lens, inputs.meta.block_tables)
    int64 = (inputs.input_ids, inputs.positions, inputs.meta.slot_mapping, inputs.logits_indices)
    assert all(t.dtype == torch.int32 for t in int32) and all(t.dtype == torch.int64 for t in int64)


@pytest.mark.parametrize("scheduled, blocks, error", [
    (0, [0, 1], "num_scheduled_tokens=0 must be >= 1"),
    (11, [0, 1, 2], "exceeds its 10 tokens"),
    (9, [0, 1], "9 tokens need more than its 2 blocks"),
])
def test_bad_schedules_name_the_request(scheduled, blocks, error):
    with pytest.raises(ValueError, match=f"'a'.*{error}"):
        build_step_inputs([_state("a", 10, [], blocks, 0)], [scheduled], 4, torch.device("cpu"))


def test_partial_prefill_does_not_sample():
    inputs = build_step_inputs([_state("a", 10, [], [0, 1, 2], 0)], [4], 4, torch.device("cpu"))
    assert inputs.sample_req_ids == [] and inputs.logits_indices.numel() == 0


def test_token_slice_spans_prompt_and_outputs():
    prompt = torch.randint(0, 100, (int(torch.randint(1, 9, ())),)).tolist()
    outputs = torch.randint(0, 100, (int(torch.randint(0, 9, ())),)).tolist()
    state = RequestState("r", prompt, outputs, SamplingParams(), [], 0)
    everything = prompt + outputs
    for start in range(len(everything) + 1):
        for end in range(start, len(everything) + 1):
            assert state.token_slice(start, end) == everything[start:end]


def test_a_request_ahead_reads_its_last_token_from_the_previous_step():
    """Under async scheduling "b" is one token past what the worker was sent: its input is
    the token the previous step sampled for it (row 1 of that step's tokens)."""
    cpu = torch.device("cpu")
    known = _state("a", 5, [11], [3, 4], 5)           # an ordinary decode of token 11
    ahead = _state("b", 3, [40, 41], [7, 1], 5)        # tokens 0..4 known, 5 sampled
    inputs = build_step_inputs([known, ahead], [1, 1], 4, cpu, earlier_samples=["c", "b"])
    earlier = torch.randint(3, 259, (2,))
    assert inputs.input_ids.tolist() == [11, 0]
    fill_ahead_tokens(inputs, earlier)
    assert inputs.input_ids.tolist() == [11, int(earlier[1])]
    assert inputs.positions.tolist() == [5, 5]
    assert inputs.meta.slot_mapping.tolist() == [4 * 4 + 1, 1 * 4 + 1]
    assert inputs.meta.seq_lens.tolist() == [6, 6]
    assert inputs.sample_req_ids == ["a", "b"] and inputs.ahead_req_ids == ["b"]
    with pytest.raises(ValueError, match="'b'.*exceeds its 5 tokens.*previous step sampled "
                                         "no token for it"):
        build_step_inputs([ahead], [1], 4, cpu, earlier_samples=["a"])
