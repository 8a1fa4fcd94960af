"""AsyncLLM streams over an engine against the one-rank run, for the layout tests."""

import asyncio
import contextlib
import threading

from shardline import LLM, AsyncLLM, SamplingParams

from near_ties import assert_greedy_match, outputs_run

TIMEOUT_S = 60.0
MAX_TOKENS, STOP_AFTER = 10, 3


def assert_streams_match_one_rank(llm: LLM, reference: LLM, prompts: list[list[int]]) -> None:
    """Streams every prompt at once through `llm`'s engine; the consumer of the second
    stops after STOP_AFTER outputs, which aborts its request. Each stream yields one output
    per token, each a prefix of the next, with the one-rank run's greedy tokens."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                            logprobs=2)
    expected = outputs_run(reference.generate(prompts, params))
    async_llm = AsyncLLM.from_engine(llm.engine)

    async def stream(i: int, stop_after: int | None) -> list:
        outputs = []
        async with contextlib.aclosing(async_llm.generate(prompts[i], params,
                                                          f"stream-{i}")) as outputs_so_far:
            async for output in outputs_so_far:
                outputs.append(output)
                if len(outputs) == stop_after:
                    break
        return outputs

    async def main() -> list[list]:
        return await asyncio.wait_for(asyncio.gather(
            *(stream(i, STOP_AFTER if i == 1 else None) for i in range(len(prompts)))),
            TIMEOUT_S)

    streams = asyncio.run(main())
    for i, outputs in enumerate(streams):
        last = outputs[-1].outputs[0].token_ids
        assert len(last) == (STOP_AFTER if i == 1 else MAX_TOKENS)
        assert outputs[-1].finished == (i != 1)
        assert [o.outputs[0].token_ids for o in outputs] == [
            last[:n] for n in range(1, MAX_TOKENS + 1) if n <= len(last)]
    expected[1] = (expected[1][0][:STOP_AFTER], expected[1][1][:STOP_AFTER])
    assert_greedy_match(expected, outputs_run([outputs[-1] for outputs in streams]))
    for thread in threading.enumerate():
        if thread.name == "shardline-engine":
            thread.join(TIMEOUT_S)
