"""What the AsyncLLM tests over the checking fake worker share: random prompts and their
one-engine reference tokens, bounded waits (every wait ends after TIMEOUT seconds, so a
regression fails instead of hanging) and StepGate, which holds the engine inside a step."""

import asyncio
import random
import threading
import time

from fake_model import VOCAB, make_engine
from shardline.engine.llm import LLM
from shardline.sampling_params import SamplingParams


TIMEOUT = 10.0


def random_prompt(rng: random.Random, low: int = 3, high: int = 20) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(rng.randint(low, high))]


def reference_tokens(prompt: list[int], params: SamplingParams) -> list[int]:
    return LLM.from_engine(make_engine()).generate([prompt], params)[0].outputs[0].token_ids


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


async def collect(stream) -> list:
    return [output async for output in stream]


async def until(condition, what: str) -> None:
    """Yield to the event loop until `condition()` holds; fail after TIMEOUT seconds."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


def wait_idle(engine) -> None:
    deadline = time.monotonic() + TIMEOUT
    while engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "the engine never became idle"
        time.sleep(0.001)


class StepGate:
    """Holds the engine inside one chosen step (numbered from 0 over the engine's life), so a
    test can act while that step runs, whatever the machine's speed."""

    def __init__(self, engine, monkeypatch) -> None:
        self.engine = engine
        self.entered = threading.Event()
        self.release = threading.Event()
        self.at_step: int | None = None
        real_step = engine.step

        def step():
            if len(engine.executor.steps) == self.at_step:
                self.entered.set()
                assert self.release.wait(TIMEOUT), "the test never released the held step"
            return real_step()
        monkeypatch.setattr(engine, "step", step)

    def hold(self, at_step: int | None = None) -> None:
        """Hold step `at_step`, by default the next one to run."""
        self.entered.clear()
        self.release.clear()
        self.at_step = len(self.engine.executor.steps) if at_step is None else at_step

    async def held(self) -> None:
        await until(self.entered.is_set, f"the engine to enter step {self.at_step}")
