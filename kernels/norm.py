"""Triton RMSNorm with the residual add fused in: one read of x and the residual, one
write of the sum (the next layer's residual) and one of the normalized row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardline.kernels._checks import check_same_dtype, output_like, unit_last_dim


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, H, eps,
                     stride_x, stride_r, stride_o, stride_s,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_r + offs, mask=mask,
                                        other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * stride_s + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / H + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (xf * rstd * w).to(out_ptr.dtype.element_ty),
             mask=mask)


def _rows(t: torch.Tensor, name: str, h: int) -> torch.Tensor:
    """t viewed as [rows, h] with unit stride along h (copied only if it must be)."""
    if t.shape[-1] != h:
        raise ValueError(f"{name} must end in the hidden size {h}; got {tuple(t.shape)}")
    return unit_last_dim(t.reshape(-1, h))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
             residual_out: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim in fp32, as reference.rms_norm.

    With `residual`: returns (norm(x + residual), x + residual). `out` and
    `residual_out` are optional destinations shaped like x.
    """
    h = x.shape[-1]
    if weight.shape != (h,):
        raise ValueError(f"weight must be [{h}] (the last dim of x); got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have the shape of x {tuple(x.shape)}; got "
                         f"{tuple(residual.shape)}")
    check_same_dtype(x, residual=residual)
    weight = weight.contiguous()
    out = output_like(x, out)
    rows = _rows(x, "x", h)
    out_rows = out.view(-1, h)
    res_rows = _rows(residual, "residual", h) if residual is not None else rows
    if residual is not None:
        residual_out = output_like(x, residual_out, "residual_out")
    sum_rows = residual_out.view(-1, h) if residual is not None else out_rows
    block = triton.next_power_of_2(h)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](
            rows, res_rows, weight, out_rows, sum_rows, h, eps,
            rows.stride(0), res_rows.stride(0), out_rows.stride(0), sum_rows.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=min(16, max(1, block // 256)))
    return out if residual is None else (out, residual_out)
