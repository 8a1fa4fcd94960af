"""The CPU's fp32 linear layers through oneDNN, with each weight packed once at load.

torch's F.linear on the CPU hands an fp32 product to MKL's sgemm, which packs the weight
into its blocked layout inside every call; a decode step multiplies only a few dozen rows by
each weight, so work done per weight rather than per row weighs most there. Measured on a
2-core AMD EPYC, one small-llama decode step's GEMMs (8 layers, weights out of cache)
took 36/62/100 ms at 8/32/64 rows through F.linear and 29/51/79 ms through oneDNN with
weights packed beforehand; 2048-row prefill chunks 1.95 s against 1.60 s (1 thread, CPU
time, medians of interleaved runs). The costs: the packed copy is oneDNN's own layout, kept
beside the dense weight (which the kernel paths and tests read), so the linear weights take
twice their memory on the CPU; and oneDNN builds its kernel for each new row count of a
shape once, about 1 ms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _onednn_ops() -> bool:
    """Whether this torch build has the oneDNN linear ops (x86 and aarch64 wheels do)."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's packed copy of a linear weight [out, in], or None where the packed path does
    not apply: a weight off the CPU, not fp32 (bf16 and fp16 products already go through
    oneDNN in torch), not 2-D, empty, or a torch build without the ops."""
    if (weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2
            or weight.numel() == 0 or not _onednn_ops()):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def packed_linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, in] @ weight^T (+ bias) -> [M, out], through `packed` (pack_weight(weight))
    where it applies: a CPU fp32 x of at least one row; else F.linear on the dense weight."""
    if (packed is None or x.dim() != 2 or x.shape[0] == 0 or x.dtype != torch.float32
            or x.device.type != "cpu"):
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def pack_cpu_weights(model: torch.nn.Module) -> None:
    """Pack every weight of `model` whose module packs for the CPU (pack_for_cpu), once its
    weights are loaded."""
    for module in model.modules():
        pack = getattr(module, "pack_for_cpu", None)
        if pack is not None:
            pack()
