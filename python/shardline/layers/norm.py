"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch
from torch import nn

from shardline import kernels
from shardline.layers import cpu_ops
from shardline.layers.weights import Loaded, check_shape, copy_into, read_slice


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale; given a residual, adds it first and returns both the
    normalized tensor and the new residual, as pre-norm decoder layers need."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, name: str,
                      shard_id: object = None) -> None:
        check_shape(name, loaded, tuple(param.shape))
        copy_into(param, read_slice(loaded))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x), or with `residual`: (norm(x + residual), x + residual); tokens [T, H]
        in fp32 on the CPU in one C++ pass (layers.cpu_ops)."""
        if x.dim() == 2 and cpu_ops.applies(x):
            return cpu_ops.rms_norm(x, self.weight, self.eps, residual)
        return kernels.rms_norm(x, self.weight, self.eps, residual)
