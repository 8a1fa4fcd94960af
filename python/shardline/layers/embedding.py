"""Token embedding and LM head with the vocabulary split across tensor-parallel ranks.

Each rank holds ceil(vocab / tp) rows; the last rank's rows past the vocabulary stay
zero. The embedding sums the ranks' lookups (each rank answers only its own token ids);
the LM head gathers the ranks' logit columns on the first TP rank and drops the padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardline.distributed.parallel_state import get_tp_group
from shardline.layers.cpu_gemm import PackedWeight
from shardline.layers.weights import Loaded, check_shape, copy_into, read_slice


class VocabParallelEmbedding(nn.Module):
    """Token embedding whose vocabulary rows are split across tensor-parallel ranks."""

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        tp = get_tp_group()
        self.tp_size = tp.size
        self.num_embeddings = num_embeddings
        self.rows_per_partition = -(-num_embeddings // tp.size)
        self.vocab_start = tp.rank * self.rows_per_partition
        self.vocab_end = min(self.vocab_start + self.rows_per_partition, num_embeddings)
        self.weight = nn.Parameter(
            torch.zeros(self.rows_per_partition, embedding_dim, dtype=dtype), requires_grad=False)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, name: str,
                      shard_id: object = None) -> None:
        check_shape(name, loaded, (self.num_embeddings, param.shape[1]))
        rows = self.vocab_end - self.vocab_start
        copy_into(param[:rows], read_slice(loaded, 0, self.vocab_start, rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        out = F.embedding((input_ids - self.vocab_start) * local, self.weight)
        out = out * local.unsqueeze(-1).to(out.dtype)
        return get_tp_group().all_reduce(out)


class ParallelLMHead(PackedWeight, VocabParallelEmbedding):
    """Hidden states -> logits over the full vocabulary, on the first TP rank only (it
    samples; the other ranks return None and send their columns no further)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = self.matmul(hidden_states, None)
        if self.tp_size > 1:
            logits = get_tp_group().gather(logits, dst=0, dim=-1)
            if logits is None:
                return None
        return logits[..., :self.num_embeddings]
