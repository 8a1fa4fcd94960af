"""Outputs as a serving stack handles them: kept across steps, pickled to another process,
copied, turned into JSON."""

import copy
import dataclasses
import json
import pickle

from fake_model import VOCAB, make_engine
from shardline import RequestOutput, SamplingParams


def stream_outputs(rng) -> list[RequestOutput]:
    """Every output of one request with logprobs, step by step, up to the finished one."""
    engine = make_engine()
    params = SamplingParams(temperature=0.0, max_tokens=rng.randint(20, 40), ignore_eos=True,
                            logprobs=rng.randint(1, 4))
    engine.add_request("r", [rng.randrange(VOCAB) for _ in range(rng.randint(3, 12))], params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[-1].finished
    return outputs


def as_plain(output: RequestOutput) -> dict:
    """The output's fields with every sequence as a list, for comparing copies."""
    completions = [{**vars(c), "token_ids": list(c.token_ids),
                    "logprobs": None if c.logprobs is None else list(c.logprobs)}
                   for c in output.outputs]
    return {**vars(output), "outputs": completions}


def test_an_early_output_pickles_only_its_own_tokens(rng):
    """A kept output's snapshot pickled the whole list the engine went on growing: an
    output of the first step carried every later token and logprob."""
    outputs = stream_outputs(rng)
    early = outputs[rng.randrange(len(outputs) // 4)]
    data = pickle.dumps(early)
    received = pickle.loads(data)
    assert as_plain(received) == as_plain(early)
    plain = dataclasses.replace(early, outputs=[
        dataclasses.replace(c, token_ids=list(c.token_ids), logprobs=list(c.logprobs))
        for c in early.outputs])
    # Naming the list type costs a few bytes; every later token would cost tens.
    assert len(data) <= len(pickle.dumps(plain)) + 64


def test_outputs_copy_and_convert_to_json(rng):
    """dataclasses.asdict kept the snapshots, which json.dumps refused."""
    outputs = stream_outputs(rng)
    for output in (outputs[rng.randrange(len(outputs))], outputs[-1]):
        assert as_plain(copy.deepcopy(output)) == as_plain(output)
        decoded = json.loads(json.dumps(dataclasses.asdict(output)))
        completion = output.outputs[0]
        assert decoded["outputs"][0]["token_ids"] == list(completion.token_ids)
        assert [{int(k): v for k, v in entry.items()} for entry in
                decoded["outputs"][0]["logprobs"]] == list(completion.logprobs)
        assert decoded["prompt_token_ids"] == output.prompt_token_ids
