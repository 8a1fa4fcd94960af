"""What a benchmark sends: seeded synthetic workloads, or prompts from a JSONL file.

`shardline bench`, `shardline demo` and the scripts in bench/ share these, so that their
runs of the same seed send the same requests.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

_JSONL_KEYS = frozenset({"prompt", "max_tokens"})
_WORDS = ("the model splits each layer across ranks while the scheduler keeps every "
          "request moving through prefill and decode with paged blocks of cache").split()


@dataclass
class Workload:
    """Prompts (token ids, or text for the engine to tokenize) with an output length each:
    every request generates exactly its max_tokens (greedy, ignore_eos)."""

    prompts: list[list[int] | str]
    max_tokens: list[int]
    # Where each request was read ("file:line"), for errors that name it; None if made.
    origins: list[str] | None = None

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
    """One request per line: {"prompt": text or token ids, "max_tokens": n (optional)}.
    Other keys are refused, so that a misspelt or foreign one (e.g. "output_len") is not
    silently replaced by the default."""
    prompts: list[list[int] | str] = []
    max_tokens: list[int] = []
    origins: list[str] = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where} is not valid JSON: {exc.msg}") from None
            if isinstance(record, dict) and record.keys() - _JSONL_KEYS:
                raise ValueError(f"{where}: unknown key(s) {sorted(record.keys() - _JSONL_KEYS)}"
                                 f": a request takes only {sorted(_JSONL_KEYS)}")
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
            origins.append(where)
    if not prompts:
        raise ValueError(f"{path} holds no requests: write one JSON object per line, e.g. "
                         '{"prompt": "Hello", "max_tokens": 32}')
    return Workload(prompts, max_tokens, origins)
