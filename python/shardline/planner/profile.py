"""`shardline plan --profile`: this machine's constants for the cost model, measured.

A CPU rank's device: the matmul rate of torch at small-model shapes, and the rate at
which decode-shaped matmuls stream weights that no cache holds, each with every core's
thread in one process and with one thread in each of one process per core, all at once
(DeviceSpec.rank_rates: one rank uses all cores, several split them);
then the engine's own host time per step and per layer and the reference attention's
rate, from the engine decoding on the CPU (host_profile.py). The links: two ranks
all-reduce 4 KiB and 1 MiB tensors through the shared-memory collectives (the intranode
link) and through gloo (what ranks on different machines use: the internode link);
alpha and beta come from the two sizes, except that alpha is taken from what a 4 KiB
all-reduce after each half of a small model's layer adds, when that exceeds the
back-to-back call's time. Last, the same half layers with two ranks per core: what a
collective costs when ranks outnumber cores. Each number is the median of several runs.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace

from shardline.planner.cluster import DeviceSpec, Link
from shardline.planner.collectives import all_reduce_time
from shardline.planner.host_profile import measure_host

SIZES = (4096, 1 << 20)
REPEATS = 5
TIMEOUT_S = 120.0
# The weight shapes of a small Llama's layer (hidden 512): Q, K and V fused, O, gate
# and up fused, down.
LAYER_SHAPES = ((1536, 512), (512, 512), (3072, 512), (512, 1536))
# Ranks sharing cores run two per core on at most this many cores.
SHARING_CORES = 4


def _median_time(call: Callable[[], object], iters: int, repeats: int = REPEATS) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            call()
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


def measure_device() -> DeviceSpec:
    """Matmul rate, weight-streaming bandwidth and the engine's host time on this CPU."""
    import torch

    threads = torch.get_num_threads()
    rates, bandwidth = _matmul_rate(torch), _stream_bandwidth(torch)
    per_core, bandwidth_per_core = _per_core_rates(threads)
    host = measure_host()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return DeviceSpec(name="CPU", memory_bytes=float(memory), flops=rates,
                      memory_bandwidth=bandwidth, shared_by_ranks=True, cores=threads,
                      flops_per_core=per_core, bandwidth_per_core=bandwidth_per_core,
                      **asdict(host))


def _matmul_rate(torch) -> float:
    """Median flop rate of fp32 matmuls at the shapes of small models' decode and
    prefill steps, with torch's current thread count."""
    rates = []
    for m, k, n in ((16, 512, 1536), (256, 512, 1536), (1024, 1024, 1024)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        seconds = _median_time(lambda: a @ b, iters=max(3, int(2e8 / (m * k * n))))
        rates.append(2 * m * k * n / seconds)
    return statistics.median(rates)


def _layer_inputs(torch) -> dict:
    """A decode step's activations (16 tokens) for each input width of LAYER_SHAPES."""
    return {k: torch.randn(16, k) for k in {shape[1] for shape in LAYER_SHAPES}}


def _stream_bandwidth(torch, layers: int = 8) -> float:
    """Weight bytes per second of decode steps' matmuls (16 tokens) through `layers`
    layers of a small Llama's projections, about 100 MB, more than caches hold: the
    rate a decode step reads its weights at (on CPUs far below a copy's bandwidth)."""
    import torch.nn.functional as F

    weights = [torch.randn(shape) for _ in range(layers) for shape in LAYER_SHAPES]
    inputs = _layer_inputs(torch)

    def step() -> None:
        for w in weights:
            F.linear(inputs[w.shape[1]], w)

    return sum(w.numel() * 4 for w in weights) / _median_time(step, iters=2)


def _core_main(index: int, barrier, results: multiprocessing.Queue) -> None:
    try:
        import torch

        torch.set_num_threads(1)
        barrier.wait(timeout=TIMEOUT_S)
        results.put(("ok", (_matmul_rate(torch), _stream_bandwidth(torch))))
    except BaseException as exc:
        results.put(("error", f"core {index}: {type(exc).__name__}: {exc}"))


def _per_core_rates(cores: int) -> tuple[float, float]:
    """(matmul rate, weight-streaming bandwidth) of one single-threaded process while
    every core runs one, as CPU ranks do (medians over the processes)."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(cores)
    payloads = _spawn(ctx, _core_main, cores, cores, (barrier,), "measuring the cores")
    return (statistics.median(p[0] for p in payloads),
            statistics.median(p[1] for p in payloads))


def _spawn(ctx, target: Callable, count: int, replies: int, args: tuple,
           what: str) -> list:
    """Run `target(index, *args, results)` in `count` processes; the payloads of the
    first `replies` results (RuntimeError naming `what` on an error or a timeout)."""
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(i, *args, results), daemon=True)
             for i in range(count)]
    for p in procs:
        p.start()
    payloads = []
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while len(payloads) < replies:
            try:
                status, payload = results.get(timeout=0.5)
            except queue.Empty:
                # A process that died before it could report (killed, or unable to
                # start) would otherwise leave this waiting for the whole timeout.
                dead = [(i, p.exitcode) for i, p in enumerate(procs)
                        if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"{what} failed: process {dead[0][0]} exited with "
                                       f"code {dead[0][1]} before reporting") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{what} failed: no result within {TIMEOUT_S:g} s"
                                       ) from None
                continue
            if status != "ok":
                raise RuntimeError(f"{what} failed: {payload}")
            payloads.append(payload)
    finally:
        # After a failure the others are not waited for: they may be waiting on the one
        # that failed.
        for p in procs:
            p.join(timeout=10 if len(payloads) == replies else 0)
            if p.is_alive():
                p.kill()
                p.join()
    return payloads


def _group_main(rank: int, size: int, init_method: str, measure: Callable,
                cpus: set[int] | None, results: multiprocessing.Queue) -> None:
    """Rank `rank` of a TP group of `size` single-threaded CPU ranks, on `cpus` if given:
    rank 0 reports `measure(torch, comm)`."""
    try:
        if cpus:
            os.sched_setaffinity(0, cpus)
        import torch

        from shardline.distributed import parallel_state as ps
        from shardline.distributed.grid import RankGrid

        torch.set_num_threads(1)
        ps.init_distributed(RankGrid(tp=size), rank, init_method, "cpu", timeout=TIMEOUT_S)
        payload = measure(torch, ps.get_tp_group().comm)
        if rank == 0:
            results.put(("ok", payload))
    except BaseException as exc:
        results.put(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))
    finally:
        if "ps" in locals():
            ps.destroy_distributed()


def _run_group(size: int, measure: Callable, what: str, cpus: set[int] | None = None):
    """Rank 0's result of `measure` run by a group of `size` ranks (see _group_main)."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        payload, = _spawn(ctx, _group_main, size, 1,
                          (size, f"file://{tmp}/store", measure, cpus), what)
    return payload


def _link_times(torch, comm) -> dict[str, float]:
    """All-reduce times through the shared-memory collectives and through gloo."""
    segment = comm.shm
    times = {}
    try:
        for backend in ("shm", "gloo"):
            comm.shm = segment if backend == "shm" else None
            for nbytes in SIZES:
                x = torch.randn(nbytes // 4)
                comm.barrier()
                times[f"{backend}/{nbytes}"] = _median_time(lambda: comm.all_reduce(x),
                                                            iters=20)
            times[f"{backend}/in_layer"] = max(0.0, _collective_in_layers(torch, comm))
    finally:
        comm.shm = segment
    return times


def _fit_two_rank_all_reduce(t_small: float, t_large: float, name: str,
                             t_in_layer: float | None = None) -> Link:
    """alpha and beta of a link from two all-reduce times at 2 ranks (ring: 2 alpha +
    B / beta); alpha from the in-layer time of the small size when given, since that is
    what a step pays per collective."""
    small, large = SIZES
    beta = (large - small) / max(t_large - t_small, 1e-9)
    t_small = t_small if t_in_layer is None else max(t_small, t_in_layer)
    alpha = max(0.0, (t_small - small / beta) / 2)
    return Link(latency_s=alpha, bandwidth=beta, name=name)


def measure_links() -> tuple[Link, Link]:
    """(shared-memory link, gloo link) between two ranks of this machine."""
    payload = _run_group(2, _link_times, "measuring the collectives")
    small, large = SIZES
    return tuple(_fit_two_rank_all_reduce(payload[f"{b}/{small}"], payload[f"{b}/{large}"],
                                          name, payload[f"{b}/in_layer"])
                 for b, name in (("shm", "shared memory"), ("gloo", "gloo")))


def _collective_in_layers(torch, comm, layers: int = 8, iters: int = 48,
                          repeats: int = 9) -> float:
    """What a 4 KiB all-reduce after each half layer (attention's projections, then the
    MLP's, as TP layers call it) adds per call: the median over pairs of runs of half
    layers with and without it. The halves stream the weights of `layers` layers, more
    than caches hold, as a decode step does. Beyond the call itself this counts the
    ranks' skew and the wake-up of a rank that went to sleep waiting (back-to-back calls
    see neither)."""
    import torch.nn.functional as F

    halves = [[torch.randn(shape) for shape in LAYER_SHAPES[i:i + 2]]
              for _ in range(layers) for i in (0, 2)]
    inputs, x = _layer_inputs(torch), torch.randn(SIZES[0] // 4)

    def run(reduce: bool) -> None:
        for i in range(iters):
            for w in halves[i % len(halves)]:
                F.linear(inputs[w.shape[1]], w)
            if reduce:
                comm.all_reduce(x)

    def timed(reduce: bool) -> float:
        comm.barrier()
        start = time.perf_counter()
        run(reduce)
        return (time.perf_counter() - start) / iters

    # Paired runs, back to back, so that a drift of the machine's speed cancels.
    return statistics.median(timed(True) - timed(False) for _ in range(repeats))


def measure_core_sharing(link: Link) -> float:
    """DeviceSpec.shared_core_collective_s: what a layer's all-reduce costs beyond `link`'s
    time when two ranks share each core (of up to SHARING_CORES cores)."""
    cpus = set(sorted(os.sched_getaffinity(0))[:SHARING_CORES])
    size = 2 * len(cpus)
    per_call = _run_group(size, _collective_in_layers, "measuring ranks that share cores",
                          cpus)
    return max(0.0, per_call - all_reduce_time(size, SIZES[0], link))


def write_profile(path: str, progress: Callable[[str], None] | None = None) -> dict:
    """Measure and write the profile file; returns what it wrote. `progress`, if given,
    is told each stage as it starts (the whole takes about a minute)."""
    say = progress or (lambda message: None)
    say("1/3 the CPU: matmul and weight-streaming rates, the engine's host time per step "
        "and per layer")
    device = measure_device()
    say("2/3 the links: all-reduce through shared memory and through gloo, two ranks")
    shm, gloo = measure_links()
    say("3/3 collectives of ranks that share cores, two per core")
    device = replace(device, shared_core_collective_s=measure_core_sharing(shm))
    data = {"device": device.__dict__, "intranode": shm.__dict__, "internode": gloo.__dict__,
            "devices_per_node": os.cpu_count() or 1,
            "measured": {"host": os.uname().nodename, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                         "load_average": os.getloadavg()}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    return data
