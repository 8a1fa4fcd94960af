"""What the engine tests share: greedy sampling params, the token ids of outputs and the
check that a finished engine holds nothing, over the checking fake worker (fake_model.py)
or a real one."""

from shardline.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def assert_all_free(engine) -> None:
    """No request, no sequence, no sequence in a step in flight, every KV block free, and
    the block tables consistent."""
    engine.kv.check_invariants()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.seqs
    assert not engine.scheduler._in_flight


def token_ids(outputs):
    """The token ids of every completion of each output."""
    return [[c.token_ids for c in o.outputs] for o in outputs]
