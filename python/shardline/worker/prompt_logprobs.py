"""Prompt logprobs: for each prompt token after the first, its log-probability given the
tokens before it, and the k most likely tokens there, for the requests that ask.

They are the log-softmax of the raw model logits at the position before (no penalties,
filters or temperature). Logits are computed only at the prompt positions of requests that
ask, and only CHUNK_BYTES of fp32 logits at a time: of each chunk's rows just the actual
token's logprob and the k best are kept (a 4k-token prompt over a 50k-token vocabulary
would otherwise hold 800 MB of logits). Under tensor parallelism every rank runs the
LM head on the same chunks (it gathers the vocabulary's columns on the first rank, which
alone computes the logprobs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from shardline.device_copy import to_device
from shardline.step import PromptLogprobs
from shardline.worker.input_batch import StepInputs

CHUNK_BYTES = 64 << 20


@dataclass
class PendingPromptLogprobs:
    """One step's prompt logprobs on the device, row after row for each span: (request id,
    the k it asked for, and the positions [start, end) whose next token is scored)."""

    spans: list[tuple[str, int, int, int]]
    token_logprobs: torch.Tensor                  # [rows]
    top_logprobs: torch.Tensor                    # [rows, largest k asked]
    top_token_ids: torch.Tensor
    _host: list[torch.Tensor] = field(default_factory=list, init=False, repr=False)
    _copied: torch.cuda.Event | None = field(default=None, init=False, repr=False)

    def start_host_copy(self) -> None:
        """On a GPU, queue the copies to the host behind the work that computes them (as
        the sampler's output does), so that reading them waits for nothing after."""
        if self.token_logprobs.device.type != "cuda":
            return
        self._host = [t.to("cpu", non_blocking=True) for t in
                      (self.token_logprobs, self.top_logprobs, self.top_token_ids)]
        self._copied = torch.cuda.Event()
        self._copied.record()

    def to_host(self) -> list[PromptLogprobs]:
        if self._copied is not None:
            self._copied.synchronize()
        tensors = self._host or [self.token_logprobs, self.top_logprobs, self.top_token_ids]
        token_lps, top_lps, top_ids = (t.tolist() for t in tensors)
        out, row = [], 0
        for req_id, k, start, end in self.spans:
            rows = slice(row, row + end - start)
            out.append(PromptLogprobs(req_id, start + 1, token_lps[rows],
                                      [ids[:k] for ids in top_ids[rows]],
                                      [lps[:k] for lps in top_lps[rows]]))
            row += end - start
        return out


def compute_prompt_logprobs(inputs: StepInputs, hidden: torch.Tensor,
                            compute_logits: Callable[[torch.Tensor], torch.Tensor | None],
                            vocab_size: int, max_rows: int | None = None
                            ) -> PendingPromptLogprobs | None:
    """The prompt logprobs of the step's spans, from the final hidden states; None where
    there are none, or on a rank the LM head gives no logits. At most `max_rows` rows go
    to the LM head at once, where given (the rows its kernels were compiled for)."""
    spans = inputs.prompt_logprob_spans
    if not spans:
        return None
    rows, targets, asked = [], [], []
    for req, first_row, start, end in spans:
        rows += range(first_row, first_row + end - start)
        targets += req.prompt_token_ids[start + 1:end + 1]
        asked.append((req.req_id, min(req.sampling_params.prompt_logprobs, vocab_size),
                      start, end))
    top_k = max(k for _, k, _, _ in asked)
    index = to_device([rows, targets], hidden.device, torch.int64)
    chunk = max(1, min(CHUNK_BYTES // (4 * vocab_size), max_rows or len(rows)))
    token_lps, top_lps, top_ids = [], [], []
    for begin in range(0, len(rows), chunk):
        logits = compute_logits(hidden[index[0, begin:begin + chunk]])
        if logits is None:
            continue
        logprobs = logits.float().log_softmax(dim=-1)
        token_lps.append(logprobs.gather(1, index[1, begin:begin + chunk, None])[:, 0])
        values, ids = logprobs.topk(top_k)
        top_lps.append(values)
        top_ids.append(ids)
    if not token_lps:
        return None
    pending = PendingPromptLogprobs(asked, torch.cat(token_lps), torch.cat(top_lps),
                                    torch.cat(top_ids))
    pending.start_host_copy()
    return pending
