"""What a benchmark sends: seeded synthetic workloads, or prompts from a JSONL file.

`shardline bench`, `shardline demo` and the scripts in bench/ share these, so that their
runs of the same seed send the same requests.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

_WORDS = ("the model splits each layer across ranks while the scheduler keeps every "
          "request moving through prefill and decode with paged blocks of cache").split()


@dataclass
class Workload:
    """Prompts (token ids, or text for the engine to tokenize) with an output length each:
    every request generates exactly its max_tokens (greedy, ignore_eos)."""

    prompts: list[list[int] | str]
    max_tokens: list[int]

    @property
    def total_output_tokens(self) -> int:
        return sum(self.max_tokens)


def make_workload(num_prompts: int, vocab_size: int, seed: int = 0,
                  prompt_len: tuple[int, int] = (16, 256),
                  output_len: tuple[int, int] = (16, 128)) -> Workload:
    """Mixed prompt and output lengths, uniform in the given inclusive ranges."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts={num_prompts} is invalid: must be >= 1")
    for name, (low, high) in (("prompt_len", prompt_len), ("output_len", output_len)):
        if not 1 <= low <= high:
            raise ValueError(f"{name}=({low}, {high}) is invalid: need 1 <= low <= high")
    rng = random.Random(seed)
    # Avoid the lowest ids, where tokenizers keep their special tokens.
    low_id = min(8, vocab_size - 1)
    prompts = [[rng.randrange(low_id, vocab_size) for _ in range(rng.randint(*prompt_len))]
               for _ in range(num_prompts)]
    max_tokens = [rng.randint(*output_len) for _ in range(num_prompts)]
    return Workload(prompts, max_tokens)


def demo_prompts(count: int) -> list[str]:
    """Short readable prompts for the demo."""
    rng = random.Random(count)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
            for _ in range(count)]


def load_jsonl(path: str | Path, default_max_tokens: int = 128) -> Workload:
    """One request per line: {"prompt": text or token ids, "max_tokens": n (optional)}."""
    prompts: list[list[int] | str] = []
    max_tokens: list[int] = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where} is not valid JSON: {exc.msg}") from None
            prompt = record.get("prompt") if isinstance(record, dict) else None
            is_ids = isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt)
            if not (isinstance(prompt, str) and prompt) and not is_ids:
                raise ValueError(f"{where}: \"prompt\" must be a non-empty string or list of "
                                 f"token ids, got {prompt!r:.80}")
            n = record.get("max_tokens", default_max_tokens)
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"{where}: \"max_tokens\"={n!r} must be an integer >= 1")
            prompts.append(prompt)
            max_tokens.append(n)
    if not prompts:
        raise ValueError(f"{path} holds no requests: write one JSON object per line, e.g. "
                         '{"prompt": "Hello", "max_tokens": 32}')
    return Workload(prompts, max_tokens)
