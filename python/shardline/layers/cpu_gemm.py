"""The CPU's fp32 linear layers through oneDNN, with each weight packed once at load.

torch's F.linear on the CPU hands an fp32 product to MKL's sgemm, which packs the weight
into its blocked layout inside every call; a decode step multiplies only a few dozen rows by
each weight, so work done per weight rather than per row weighs most there. Measured on a
2-core AMD EPYC, one small-llama decode step's GEMMs (8 layers, weights out of cache)
took 36/62/100 ms at 8/32/64 rows through F.linear and 29/51/79 ms through oneDNN with
weights packed beforehand; 2048-row prefill chunks 1.95 s against 1.60 s (1 thread, CPU
time, medians of interleaved runs). The costs: the packed copy is oneDNN's own layout, kept
beside the dense weight (which the kernel paths and tests read), so the linear weights take
twice their memory on the CPU (so the copies are made only while they take at most
PACK_FRACTION of the memory available, see pack_cpu_weights); and oneDNN builds its kernel
for each new row count of a shape once, about 1 ms.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

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


def pack_cpu_weights(model: torch.nn.Module) -> None:
    """Pack every weight of `model` whose module packs for the CPU (pack_for_cpu), once its
    weights are loaded and of at least MIN_PACK_BYTES, unless the copies would take more
    than PACK_FRACTION of the memory available now (then every product stays on the dense
    weights, and the log says so)."""
    modules = [m for m in model.modules()
               if hasattr(m, "pack_for_cpu") and packable(m.weight)
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
