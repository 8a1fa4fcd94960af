"""Random prompts and the token ids of outputs, for the engine tests that compare layouts."""

import random


def random_prompt(rng: random.Random, low: int, high: int) -> list[int]:
    return [rng.randrange(3, 259) for _ in range(rng.randint(low, high))]


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]
