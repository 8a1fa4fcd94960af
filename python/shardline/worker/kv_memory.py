"""How many bytes one rank's KV cache may take, from the memory actually free on its device.

The budget is read after the weights are loaded, so they are already counted as used. On
a GPU the rank may fill `gpu_memory_utilization` of the device: that share of its total
memory, minus everything in use by then (weights, the CUDA context, other processes); the
rest stays free for activations and CUDA graphs. On the CPU the cache shares the machine
with everything else, so it takes half of MemAvailable (/proc/meminfo), split evenly over
the ranks of the machine, at most CPU_CAP_BYTES per rank and at most what the scheduler can
ever fill (max_num_seqs sequences of max_model_len tokens).

On the CPU the cache itself lives in anonymous memory backed by 2 MiB pages where the
kernel allows (allocate_kv_cache).
"""

from __future__ import annotations

import contextlib
import gc
import math
import mmap
from dataclasses import dataclass

import torch

from shardline.config import CacheConfig

CPU_FRACTION = 0.5
CPU_CAP_BYTES = 4 << 30
MEMINFO = "/proc/meminfo"


@dataclass
class KVBudget:
    """A byte budget for the KV cache and how it was derived (for logs and errors)."""

    num_bytes: int
    origin: str


def mem_available_bytes(meminfo: str = MEMINFO) -> int:
    """MemAvailable from /proc/meminfo: what can be allocated without swapping."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError as exc:
        raise RuntimeError(f"cannot read {meminfo} to size the KV cache ({exc}): set "
                           "kv_cache_memory_bytes or num_kv_blocks") from None
    raise RuntimeError(f"{meminfo} has no MemAvailable line to size the KV cache by: set "
                       "kv_cache_memory_bytes or num_kv_blocks")


def gpu_budget(device: torch.device, utilization: float) -> KVBudget:
    """`utilization` of the GPU's total memory, minus all memory in use on it now.

    Memory this process no longer uses (an earlier engine's tensors, still unreachable
    garbage or cached by torch's allocator) is released first, so it counts as free.
    """
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    in_use = total - free
    budget = int(utilization * total) - in_use
    return KVBudget(max(budget, 0), f"gpu_memory_utilization={utilization} of {_size(total)} "
                                    f"on {device}, {_size(in_use)} already in use")


def cpu_budget(num_local_ranks: int, usable_bytes: int, meminfo: str = MEMINFO) -> KVBudget:
    """A share of MemAvailable per rank, capped by CPU_CAP_BYTES and by `usable_bytes`
    (the most the scheduler could ever fill)."""
    available = mem_available_bytes(meminfo)
    share = int(CPU_FRACTION * available) // num_local_ranks
    budget = min(share, CPU_CAP_BYTES, usable_bytes)
    origin = (f"{CPU_FRACTION} of MemAvailable {_size(available)} over {num_local_ranks} "
              f"rank(s) is {_size(share)}")
    if budget == CPU_CAP_BYTES and budget < share:
        origin += f", capped at {_size(CPU_CAP_BYTES)} per rank"
    elif budget == usable_bytes and budget < share:
        origin += f", capped at {_size(usable_bytes)}: max_num_seqs sequences of max_model_len"
    return KVBudget(budget, origin)


def kv_cache_budget(cache: CacheConfig, device: torch.device, num_local_ranks: int,
                    usable_bytes: int) -> KVBudget:
    """The budget `cache` asks for: kv_cache_memory_bytes if set, else from free memory."""
    if cache.kv_cache_memory_bytes is not None:
        return KVBudget(cache.kv_cache_memory_bytes,
                        f"kv_cache_memory_bytes={cache.kv_cache_memory_bytes}")
    if device.type == "cuda":
        return gpu_budget(device, cache.gpu_memory_utilization)
    return cpu_budget(num_local_ranks, usable_bytes)


def allocate_kv_cache(shape: tuple[int, ...], dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
    """A zeroed tensor for one layer's K or V cache. On the CPU it lives in anonymous
    memory that Linux backs with 2 MiB pages where transparent huge pages allow it.

    Decode attention reads a sequence's blocks wherever they lie, a few KiB at a time: on
    4 KiB pages more of those reads miss the TLB (in small-llama's offline run decode
    attention took 1.15 s on huge pages against 1.24 s; bench/README.md). The pages are
    also only taken when first written, where a torch.zeros cache took all of its memory
    at start.
    """
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    return anonymous_tensor(shape, dtype, huge_pages=True)


def anonymous_tensor(shape: tuple[int, ...], dtype: torch.dtype,
                     huge_pages: bool) -> torch.Tensor:
    """A zeroed CPU tensor in anonymous memory, whose pages are taken when first written,
    with Linux asked to back it with 2 MiB pages or never to (where the kernel knows
    transparent huge pages at all)."""
    num_bytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if num_bytes == 0:
        return torch.zeros(shape, dtype=dtype)
    memory = mmap.mmap(-1, num_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE" if huge_pages else "MADV_NOHUGEPAGE", None)
    if advice is not None:
        with contextlib.suppress(OSError):  # a kernel built without huge pages
            memory.madvise(advice)
    return torch.frombuffer(memory, dtype=dtype).view(shape)


def _size(num_bytes: int) -> str:
    """In GiB, or in MiB below 1 GiB: a tiny model's cache read "0.00 GiB"."""
    if num_bytes >= 1 << 30:
        return f"{num_bytes / (1 << 30):.2f} GiB"
    return f"{num_bytes / (1 << 20):.2f} MiB"
