"""The CPU's fp32 linear layers through oneDNN, with each weight packed once at load.

torch's F.linear on the CPU hands an fp32 product to MKL's sgemm, which packs the weight
into its blocked layout inside every call; a decode step multiplies only a few dozen rows by
each weight, so work done per weight rather than per row weighs most there. Measured on a
2-core AMD EPYC, one small-llama decode step's GEMMs (8 layers, weights out of cache)
took 36/62/100 ms at 8/32/64 rows through F.linear and 29/51/79 ms through oneDNN with
weights packed beforehand; 2048-row prefill chunks 1.95 s against 1.60 s (1 thread, CPU
time, medians of interleaved runs). The costs: the packed copy is oneDNN's own layout, kept
beside the dense weight (which the kernel paths and tests read), so a packed weight takes
twice its memory (the copies are made only while they take at most PACK_FRACTION of the
memory available, see pack_cpu_weights); each call costs more than F.linear's, which only
weights of MIN_PACK_BYTES and more repay; and oneDNN builds its kernel for each new row
count of a shape once, about 1 ms.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from shardline import kernels
from shardline.kernels.dispatch import use_triton
from shardline.worker.kv_memory import mem_available_bytes

logger = logging.getLogger(__name__)

# The packed copies may take at most this share of MemAvailable: a model that fills much of
# the machine's memory runs on its dense weights rather than risk running out at load.
PACK_FRACTION = 0.25
# oneDNN's call costs about 85 us more than F.linear's, which a weight this large repays at
# every row count (2 cores: a 2 MiB weight at 1/8/64 rows 1.05x/1.7x/1.6x F.linear's speed,
# a 0.6 MiB one 0.4x/0.7x/1.1x); smaller weights, cache-resident, stay on F.linear.
MIN_PACK_BYTES = 2 << 20


def _onednn_ops() -> bool:
    """Whether this torch build has the oneDNN linear ops (x86 and aarch64 wheels do)."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's packed copy of a linear weight [out, in], or None where the packed path does
    not apply: a weight off the CPU, not fp32 (bf16 and fp16 products already go through
    oneDNN in torch), not 2-D, empty, or a torch build without the ops."""
    if not packable(weight):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def packable(weight: torch.Tensor) -> bool:
    """Whether pack_weight makes a packed copy of `weight`."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32
            and weight.dim() == 2 and weight.numel() > 0 and _onednn_ops())


def packed_linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, in] @ weight^T (+ bias) -> [M, out], through `packed` (pack_weight(weight))
    where it applies: a CPU fp32 x of at least one row; else F.linear on the dense weight."""
    if (packed is None or x.dim() != 2 or x.shape[0] == 0 or x.dtype != torch.float32
            or x.device.type != "cpu"):
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


class PackedWeight:
    """A module with a [out, in] `weight` whose products may go through a packed copy of it
    (LinearBase, ParallelLMHead): pack_cpu_weights packs it once it is loaded."""

    weight: torch.Tensor
    packed: torch.Tensor | None = None

    def pack_for_cpu(self) -> None:
        """Pack the loaded weight (nothing where pack_weight does not apply). Once the weight
        holds its final values: the copy does not follow later writes to it, and a tied
        embedding keeps reading the dense weight."""
        self.packed = pack_weight(self.weight)

    def uses_packed(self, x: torch.Tensor) -> bool:
        """Whether a product with `x` takes the packed weight: packed, and `x` not bound
        for Triton (SHARDLINE_FORCE_TRITON=1 runs the kernels on CPU tensors)."""
        return self.packed is not None and not use_triton(x)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ weight^T (+ bias): through the packed weight where `uses_packed`, else
        kernels.linear."""
        if self.uses_packed(x):
            return packed_linear(x, self.weight, self.packed, bias)
        return kernels.linear(x, self.weight, bias)


def pack_cpu_weights(model: torch.nn.Module) -> None:
    """Pack every PackedWeight's weight in `model`, once its
    weights are loaded and of at least MIN_PACK_BYTES, unless the copies would take more
    than PACK_FRACTION of the memory available now (then every product stays on the dense
    weights, and the log says so)."""
    modules = [m for m in model.modules()
               if isinstance(m, PackedWeight) and packable(m.weight)
               and m.weight.numel() * m.weight.element_size() >= MIN_PACK_BYTES]
    needed = sum(m.weight.numel() * m.weight.element_size() for m in modules)
    if not needed:
        return
    try:
        available = mem_available_bytes()
    except RuntimeError:
        logger.info("linear weights not packed for oneDNN: the memory available is unknown")
        return
    if needed > PACK_FRACTION * available:
        logger.info("linear weights not packed for oneDNN: the packed copies would take "
                    "%.1f GiB, more than %s of the %.1f GiB available", needed / 2**30,
                    PACK_FRACTION, available / 2**30)
        return
    for module in modules:
        module.pack_for_cpu()
