"""Megatron-style linear layers: each rank holds a slice of the weight.

Column-parallel layers split the output features (each rank computes its own columns);
row-parallel layers split the input features and sum the partial products across the
tensor-parallel group. Each layer's `weight_loader` picks this rank's slice from the full
checkpoint tensor, so the same checkpoint serves every tensor-parallel size.
"""

from __future__ import annotations

import torch
from torch import nn

from shardline import kernels
from shardline.distributed.parallel_state import get_tp_group
from shardline.layers import cpu_ops
from shardline.layers.cpu_gemm import PackedWeight
from shardline.layers.norm import RMSNorm
from shardline.layers.weights import Loaded, check_shape, copy_into, read_slice


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what}={total} is not divisible by tensor_parallel_size={parts}")
    return total // parts


class LinearBase(PackedWeight, nn.Module):
    """A weight [out, in] (and optional bias [out]) of this rank's partition."""

    def __init__(self, input_size: int, output_size: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank, tp.size
        self.input_size, self.output_size = input_size, output_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=dtype),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(output_size, dtype=dtype), requires_grad=False)
                     if bias else None)


class ReplicatedLinear(LinearBase):
    """A full weight on every rank (routers, small gates)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__(input_size, output_size, bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, name: str,
                      shard_id: object = None) -> None:
        check_shape(name, loaded, tuple(param.shape))
        copy_into(param, read_slice(loaded))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; no communication (the next layer consumes slices)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32):
        tp_size = get_tp_group().size
        super().__init__(input_size, _divide(output_size, tp_size, "output_size"), bias, dtype)
        self.full_output_size = output_size

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, name: str,
                      shard_id: object = None) -> None:
        rows = param.shape[0]
        check_shape(name, loaded, (self.full_output_size, *param.shape[1:]))
        copy_into(param, read_slice(loaded, 0, self.tp_rank * rows, rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input stacked into one weight
    (gate and up of a SiLU MLP); shard i of the checkpoint fills rows of output i."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__(input_size, sum(output_sizes), bias, dtype)
        self.output_sizes = output_sizes

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, name: str,
                      shard_id: object = None) -> None:
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"shard_id={shard_id!r} for {name!r} is invalid: "
                             f"must be an int in [0, {len(self.output_sizes)})")
        full = self.output_sizes[shard_id]
        rows = full // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        check_shape(name, loaded, (full, *param.shape[1:]))
        copy_into(param[offset:offset + rows], read_slice(loaded, 0, self.tp_rank * rows, rows))

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up of a (gate, up) pair with this layer's weight and bias:
        [M, input_size] -> [M, this rank's share of one output], the activation fused into
        the GEMM (on the CPU in fp32: the product, then one C++ pass, layers.cpu_ops). Each
        rank holds matching gate and up columns, so no communication."""
        if len(self.output_sizes) != 2 or self.output_sizes[0] != self.output_sizes[1]:
            raise ValueError(f"silu_mul needs two equal outputs (gate, up); this layer has "
                             f"output_sizes={self.output_sizes}")
        if cpu_ops.applies(x):
            return cpu_ops.silu_mul(self.matmul(x, self.bias))
        return kernels.linear_silu_mul(x, self.weight, self.bias)


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections in one weight; heads split across ranks.

    With fewer KV heads than ranks, KV heads are replicated so each rank has one.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, dtype: torch.dtype = torch.float32):
        tp_size = get_tp_group().size
        self.num_heads = _divide(num_heads, tp_size, "num_attention_heads")
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.total_num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        total_out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, total_out, bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, name: str,
                      shard_id: object = None) -> None:
        q_rows = self.num_heads * self.head_dim
        kv_rows = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, rows, full = 0, q_rows, q_rows * self.tp_size
            start = self.tp_rank * rows
        elif shard_id in ("k", "v"):
            offset = q_rows if shard_id == "k" else q_rows + kv_rows
            rows, full = kv_rows, self.total_num_kv_heads * self.head_dim
            replicas = max(1, self.tp_size // self.total_num_kv_heads)
            start = (self.tp_rank // replicas) * rows
        else:
            raise ValueError(f"shard_id={shard_id!r} for {name!r} is invalid: "
                             "must be 'q', 'k' or 'v'")
        check_shape(name, loaded, (full, *param.shape[1:]))
        copy_into(param[offset:offset + rows], read_slice(loaded, 0, start, rows))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed over the group.

    The bias is added once, after the sum. `residual` is fused into the product when
    this is the only rank.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32):
        tp_size = get_tp_group().size
        super().__init__(_divide(input_size, tp_size, "input_size"), output_size, bias, dtype)
        self.full_input_size = input_size

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, name: str,
                      shard_id: object = None) -> None:
        if param.dim() == 1:
            check_shape(name, loaded, tuple(param.shape))
            copy_into(param, read_slice(loaded))
            return
        cols = param.shape[1]
        check_shape(name, loaded, (param.shape[0], self.full_input_size))
        copy_into(param, read_slice(loaded, 1, self.tp_rank * cols, cols))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.tp_size == 1 and not self.uses_packed(x):
            return kernels.linear(x, self.weight, self.bias, residual)
        if self.tp_size == 1:
            out = self.matmul(x, self.bias)
            return out if residual is None else out + residual
        out = get_tp_group().all_reduce(self.matmul(x, None))
        if self.bias is not None:
            out = out + self.bias
        return out if residual is None else out + residual

    def forward_and_norm(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(self(x) + residual), self(x) + residual): a pre-norm block's output
        projection and the next norm. Alone on its rank, the add and the norm ride the
        product's reduction (kernels.linear_rms_norm; on the CPU in fp32, one C++ pass
        after the product that stores the sum in the product's own output); otherwise they
        follow the all-reduce."""
        if self.tp_size == 1 and cpu_ops.applies(x):
            return cpu_ops.rms_norm(self.matmul(x, self.bias), norm.weight, norm.eps, residual,
                                    sum_into_x=True)
        if self.tp_size == 1:
            return kernels.linear_rms_norm(x, self.weight, self.bias, residual, norm.weight,
                                           norm.eps)
        return norm(self(x), residual)
