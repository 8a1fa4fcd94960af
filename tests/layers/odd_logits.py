"""Random logits with +inf, -inf and NaN scattered in, for the sampler tests that compare
two ways of writing into them bit for bit."""

import math

import torch


def odd_logits(rows: int, vocab: int, device: str | torch.device) -> torch.Tensor:
    logits = torch.randn(rows, vocab, device=device) * 5
    odd = torch.rand(logits.shape, device=device)
    logits[odd < 0.01] = math.inf
    logits[odd > 0.99] = math.nan
    logits[(odd > 0.5) & (odd < 0.51)] = -math.inf
    return logits
