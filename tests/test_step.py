"""The step records on the wire: what the engine sends arrives whole through the rings'
serializer, cached requests as columns and logprobs only when a request asked for them."""

from shardline.ipc.serializer import Decoder, Encoder
from shardline.sampling_params import SamplingParams
from shardline.step import (CachedRequestData, CachedRequests, ModelRunnerOutput,
                            NewRequestData, PromptLogprobs, SchedulerOutput, TokenLogprobs)


def over_the_wire(message: dict) -> dict:
    parts = Encoder().encode(message)
    return Decoder().decode(bytearray(b"".join(bytes(part) for part in parts)))


def random_text(rng) -> str:
    """What a client may send as a stop string: any code points, lone surrogates included
    (JSON's "\\ud800" escape decodes to one)."""
    ranges = [(0x20, 0x7E), (0x80, 0xFFFF), (0xD800, 0xDFFF), (0x10000, 0x10FFFF)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 6)))


def random_sampling_params(rng) -> dict:
    return SamplingParams(
        n=rng.randint(1, 4), temperature=rng.choice([0.0, rng.uniform(0.1, 2.0)]),
        top_k=rng.choice([-1, rng.randint(1, 2**63 - 1)]), top_p=rng.uniform(0.1, 1.0),
        seed=rng.choice([None, rng.randint(-(2**63), 2**64 - 5)]),
        max_tokens=rng.choice([None, rng.randint(1, 2**63 - 1)]),
        stop_token_ids=[rng.randrange(2**63) for _ in range(rng.randint(0, 3))],
        stop=[random_text(rng) for _ in range(rng.randint(0, 3))],
        logprobs=rng.choice([None, rng.randint(0, 20)]),
        prompt_logprobs=rng.choice([None, rng.randint(0, 20)]),
    ).to_dict()


def random_step(rng, decode_only: bool = False) -> SchedulerOutput:
    def tokens(lo: int, hi: int) -> list[int]:
        return [rng.randrange(50_000) for _ in range(rng.randint(lo, hi))]

    new = [NewRequestData(f"new-{i}", tokens(1, 30), tokens(0, 3), random_sampling_params(rng),
                          tokens(1, 4), rng.randrange(8)) for i in range(rng.randint(0, 4))]
    if decode_only:
        new = []
    cached = CachedRequests.of(
        CachedRequestData(f"cached-{i}", tokens(1, 1) if decode_only else tokens(0, 3),
                          tokens(0, 1), rng.randrange(4096))
        for i in range(rng.randint(0, 40)))
    ids = [r.req_id for r in new] + cached.req_ids
    rng.shuffle(ids)  # the engine's dict order need not be the batch order
    return SchedulerOutput(new, cached, {r: 1 if decode_only else rng.randint(1, 64)
                                         for r in ids},
                           [f"done-{i}" for i in range(rng.randint(0, 3))])


def test_scheduler_output_arrives_whole(rng):
    for i in range(100):
        sent = random_step(rng, decode_only=i % 2 == 0)
        wire = sent.to_dict()
        if i % 2 == 0:  # one token each: neither counts travel
            assert wire["num_scheduled_tokens"] is None and wire["cached_requests"][2] is None
        got = SchedulerOutput.from_dict(over_the_wire(wire))
        assert got.new_requests == sent.new_requests
        assert list(got.cached_requests) == list(sent.cached_requests)
        assert got.num_scheduled_tokens == sent.num_scheduled_tokens
        assert got.finished_req_ids == sent.finished_req_ids
        assert got.req_ids == [r.req_id for r in sent.new_requests] + sent.cached_requests.req_ids


def test_cached_requests_keep_their_records_in_order(rng):
    records = [CachedRequestData(f"r{i}", [rng.randrange(100)], [], i) for i in range(5)]
    cached = CachedRequests.of(records)
    assert list(cached) == records and len(cached) == 5
    assert cached.num_new_tokens is None and cached.new_block_ids == []
    cached.append("late", [7, 8], [3], 9)
    cached.append("chunk", [], [], 4)
    assert cached.num_new_tokens == [1, 1, 1, 1, 1, 2, 0]
    assert cached.new_block_ids == [[5, [3]]]
    assert [list(run) for run in cached.token_runs()] == [[r.new_token_ids[0]] for r in records] \
        + [[7, 8], []]
    assert list(cached)[5:] == [CachedRequestData("late", [7, 8], [3], 9),
                                CachedRequestData("chunk", [], [], 4)]
    assert list(CachedRequests.of([])) == [] and len(CachedRequests()) == 0


def test_model_runner_output_arrives_whole_with_or_without_logprobs(rng):
    n = rng.randint(1, 20)
    ids = [f"r{i}" for i in range(n)]
    tokens = [rng.randrange(50_000) for _ in range(n)]
    plain = ModelRunnerOutput(ids, tokens, [None] * n)
    assert over_the_wire(plain.to_dict())["logprobs"] is None
    assert ModelRunnerOutput.from_dict(over_the_wire(plain.to_dict())) == plain
    logprobs = [TokenLogprobs(-rng.random(), [rng.randrange(99)], [-rng.random()])
                if rng.random() < 0.5 else None for _ in range(n)]
    logprobs[rng.randrange(n)] = TokenLogprobs(-0.25, [1, 2], [-0.5, -1.5])
    mixed = ModelRunnerOutput(ids, tokens, logprobs)
    got = ModelRunnerOutput.from_dict(over_the_wire(mixed.to_dict()))
    assert got == mixed and all(type(lp) in (TokenLogprobs, type(None)) for lp in got.logprobs)


def test_prompt_logprobs_arrive_whole_and_only_when_computed(rng):
    """A step's prompt logprobs, with or without sampled tokens (a chunk of a prompt)."""
    assert over_the_wire(ModelRunnerOutput().to_dict())["prompt_logprobs"] is None
    records = []
    for i in range(rng.randint(1, 4)):
        rows, k = rng.randint(1, 30), rng.randint(0, 5)
        records.append(PromptLogprobs(
            f"r{i}", rng.randint(1, 100), [-rng.random() for _ in range(rows)],
            [[rng.randrange(50_000) for _ in range(k)] for _ in range(rows)],
            [[-rng.random() for _ in range(k)] for _ in range(rows)]))
    n = rng.randint(0, 3)
    out = ModelRunnerOutput([f"s{i}" for i in range(n)], list(range(n)), [None] * n, records)
    got = ModelRunnerOutput.from_dict(over_the_wire(out.to_dict()))
    assert got == out and all(type(r) is PromptLogprobs for r in got.prompt_logprobs)
