"""The cluster the planner places ranks on: nodes of identical devices, two kinds of link.

Device constants are stated defaults per GPU kind (datasheet peaks scaled by an achieved
fraction) or come from a measured profile (`shardline plan --profile`). Bandwidths are
per device and per direction: NVLink's 900 GB/s per H100/H200 is both directions
together, 450 GB/s each way; InfiniBand's 400 Gb/s per GPU is 50 GB/s each way.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple

GB = 1e9


@dataclass(frozen=True)
class Link:
    """One hop of the alpha-beta model: a fixed latency and a per-direction bandwidth."""

    latency_s: float
    bandwidth: float  # bytes/s per direction, per device
    name: str = "link"

    def __post_init__(self) -> None:
        if not self.latency_s >= 0:
            raise ValueError(f"link latency={self.latency_s!r} s is invalid: must be >= 0")
        if not self.bandwidth > 0:
            raise ValueError(f"link bandwidth={self.bandwidth!r} B/s is invalid: must be > 0")


class RankRates(NamedTuple):
    """What one rank gets of its device: matmul flop rate, the bandwidth its weights
    stream at, and the bandwidth attention reads the KV cache at (0: in the roofline)."""

    flops: float
    bandwidth: float
    attention_bandwidth: float


@dataclass(frozen=True)
class DeviceSpec:
    """What one device does per second, and the host time the engine spends per step.

    `flops` and `memory_bandwidth` are achieved rates (not peaks); on a CPU the bandwidth
    is the rate at which decode-shaped matmuls stream their weights. `shared_by_ranks` is
    True for CPU "devices": the ranks of a node split its `cores`. One rank alone runs at
    `flops` and `memory_bandwidth` (every core's threads in one process); several run one
    or more single-threaded cores each, at `flops_per_core` and `bandwidth_per_core`,
    never more cores than the node has (shardline's CPU ranks take an equal share).

    `attention_bandwidth` is the rate at which attention reads the KV cache when it is
    not the memory roofline's (the CPU's torch reference attention); 0 counts the KV
    read in the roofline. Host time is what a step costs beyond its kernels' work:
    `step_host_s` once per step (scheduling, inputs, sampler, outputs) and
    `layer_host_s` per decoder layer call (Python, module calls, kernel launches), each
    plus a cost per sequence in the step (`*_per_seq_s`).

    `shared_core_collective_s` is what each collective call adds, beyond its link's time,
    on a CPU whose ranks outnumber its cores: the last rank to arrive goes on into its
    next half layer, and the rank sharing its core, woken, gets the core back only when
    that one blocks again.
    """

    name: str
    memory_bytes: float
    flops: float
    memory_bandwidth: float
    shared_by_ranks: bool = False
    cores: int = 1
    flops_per_core: float = 0.0
    bandwidth_per_core: float = 0.0
    attention_bandwidth: float = 0.0
    step_host_s: float = 0.0
    step_host_per_seq_s: float = 0.0
    layer_host_s: float = 0.0
    layer_host_per_seq_s: float = 0.0
    shared_core_collective_s: float = 0.0

    def rank_rates(self, ranks: int) -> RankRates:
        """The rates of one of `ranks` ranks running on one node."""
        if not self.shared_by_ranks:
            return RankRates(self.flops, self.memory_bandwidth, self.attention_bandwidth)
        if ranks == 1:
            flops, bandwidth = self.flops, self.memory_bandwidth
        else:
            cores = min(self.cores, ranks) / ranks
            flops = (self.flops_per_core * cores if self.flops_per_core
                     else self.flops / ranks)
            bandwidth = (self.bandwidth_per_core * cores if self.bandwidth_per_core
                         else self.memory_bandwidth / ranks)
        attention = self.attention_bandwidth * bandwidth / self.memory_bandwidth
        return RankRates(flops, bandwidth, attention)

    def host_slowdown(self, ranks: int) -> float:
        """How much longer host work takes when `ranks` ranks share the node's cores."""
        return max(1.0, ranks / self.cores) if self.shared_by_ranks else 1.0

    def collective_wait_s(self, ranks: int) -> float:
        """What each collective call adds when `ranks` ranks run on one node."""
        return self.shared_core_collective_s if self.shared_by_ranks and ranks > self.cores else 0.0


@dataclass(frozen=True)
class ClusterSpec:
    """`nodes` nodes of `devices_per_node` devices each."""

    nodes: int
    devices_per_node: int
    device: DeviceSpec
    intranode: Link
    internode: Link

    def __post_init__(self) -> None:
        for name in ("nodes", "devices_per_node"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: must be an integer >= 1")
        if not self.device.memory_bytes > 0:
            raise ValueError(f"device memory={self.device.memory_bytes!r} bytes is invalid: "
                             "must be > 0")

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.devices_per_node

    def to_dict(self) -> dict:
        return asdict(self)


_MFU, _MBU = 0.6, 0.8  # achieved fractions of peak matmul rate and memory bandwidth
GPU_DEFAULTS: dict[str, dict] = {
    "h100": dict(memory_gb=80, peak_tflops=989, hbm_tbs=3.35, nvlink_gbs=450, ib_gbs=50),
    "h200": dict(memory_gb=141, peak_tflops=989, hbm_tbs=4.8, nvlink_gbs=450, ib_gbs=50),
    "a100": dict(memory_gb=80, peak_tflops=312, hbm_tbs=2.0, nvlink_gbs=300, ib_gbs=25),
}
"""Dense bf16 peaks from the datasheets; NVLink and InfiniBand per GPU and direction."""
INTRANODE_LATENCY_S = 3e-6
INTERNODE_LATENCY_S = 10e-6
KERNEL_OVERHEAD_S = 4e-6  # launch cost per kernel
KERNELS_PER_LAYER = 14
KERNELS_PER_STEP = 12
ENGINE_STEP_HOST_S = 208e-6
ENGINE_SEQ_HOST_S = 18e-6
"""The engine's host time per step around the forward: 208 us plus 18 us per sequence,
the line through bench/host_overhead.py's greedy decode at batch 1 and 64
(bench/results/host_overhead.json: 225 and 1336 us). That Python runs between a GPU's
steps, not beside them, so it adds to each step as on a CPU."""


def gpu_cluster(gpu: str, nodes: int, devices_per_node: int) -> ClusterSpec:
    """A cluster of `gpu` devices with the stated defaults."""
    if gpu not in GPU_DEFAULTS:
        raise ValueError(f"gpu={gpu!r} is not known: use one of {', '.join(GPU_DEFAULTS)} "
                         "or a profile file")
    d = GPU_DEFAULTS[gpu]
    device = DeviceSpec(name=gpu.upper(), memory_bytes=d["memory_gb"] * GB,
                        flops=d["peak_tflops"] * 1e12 * _MFU,
                        memory_bandwidth=d["hbm_tbs"] * 1e12 * _MBU,
                        step_host_s=ENGINE_STEP_HOST_S + KERNELS_PER_STEP * KERNEL_OVERHEAD_S,
                        step_host_per_seq_s=ENGINE_SEQ_HOST_S,
                        layer_host_s=KERNELS_PER_LAYER * KERNEL_OVERHEAD_S)
    return ClusterSpec(nodes=nodes, devices_per_node=devices_per_node, device=device,
                       intranode=Link(INTRANODE_LATENCY_S, d["nvlink_gbs"] * GB, "NVLink"),
                       internode=Link(INTERNODE_LATENCY_S, d["ib_gbs"] * GB, "InfiniBand"))


def profile_cluster(path: str, nodes: int, devices_per_node: int | None) -> ClusterSpec:
    """A cluster of the device and links measured in a profile file (profile.py); the
    internode link, never measured on one machine, is the profile's intranode one unless
    the file states one. `devices_per_node` defaults to the profile's own."""
    try:
        with open(path) as f:
            data = json.load(f)
        _check_device_keys(path, data["device"])
        device = DeviceSpec(**data["device"])
        intranode = Link(**data["intranode"])
        internode = Link(**data.get("internode", data["intranode"]))
        per_node = devices_per_node or int(data["devices_per_node"])
    except FileNotFoundError:
        raise ValueError(f"profile file {path!r} does not exist: write one with "
                         "`shardline plan --profile --profile-file PATH`") from None
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"profile file {path!r} is not a shardline profile "
                         f"({type(exc).__name__}: {exc})") from None
    return ClusterSpec(nodes=nodes, devices_per_node=per_node, device=device,
                       intranode=intranode, internode=internode)


def _check_device_keys(path: str, device: dict) -> None:
    """Refuse a profile that lacks measured constants (one written before shardline
    measured them would predict CPU steps several times too fast)."""
    missing = [f.name for f in fields(DeviceSpec) if f.name not in device]
    if missing:
        raise ValueError(f"profile file {path!r} lacks the device constants "
                         f"{', '.join(missing)} (written by an older shardline): measure "
                         "again with `shardline plan --profile`")


def with_overrides(cluster: ClusterSpec, *, memory_bytes: float | None = None,
                   intranode: Link | None = None, internode: Link | None = None
                   ) -> ClusterSpec:
    """The cluster with some stated values replaced."""
    device = cluster.device if memory_bytes is None else replace(cluster.device,
                                                                 memory_bytes=memory_bytes)
    return replace(cluster, device=device, intranode=intranode or cluster.intranode,
                   internode=internode or cluster.internode)
