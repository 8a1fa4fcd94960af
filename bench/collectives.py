"""Collectives bench: shardline's shared-memory all-reduce and all-gather against gloo's,
fp32 CPU tensors of 4 KiB to 1 MiB per rank, at 2 and 4 ranks.

    python bench/collectives.py            full run, about 6 minutes on 2 cores
    python bench/collectives.py --quick    4 KiB and 1 MiB only, under a minute

Each world of ranks joins one TP group through init_distributed (as the workers do) and
calls the group's Communicator, the way the layers do, with its shared segment on or
off: gloo is the same Communicator with the segment taken away. All-reduce sums x in
place; all-gather writes into one output tensor reused across calls (`out=`), so that
both measure the transport rather than page faults of a fresh result. A timed run is `iters`
back-to-back calls after a warm-up, started together after a barrier; time per call is
the run's time over `iters`, on rank 0. shm and gloo take turns within every repeat so
that drifting machine load hits them alike; each number is the median over repeats.
Writes bench/results/collectives.json and collectives.png.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

from _machine import machine_info

from shardline.distributed.shm import DEFAULT_BUFFER_BYTES

RESULTS = Path(__file__).resolve().parent / "results"
WORLDS = [2, 4]
OPS = ["all_reduce", "all_gather"]
SETTINGS = {
    "quick": {"repeats": 3, "sizes": [4096, 1 << 20], "run_bytes": 8 << 20, "max_iters": 50},
    "full": {"repeats": 7, "sizes": [4096, 16384, 65536, 262144, 1 << 20],
             "run_bytes": 64 << 20, "max_iters": 400},
}
TARGET_SPEEDUP = 5.0
TIMEOUT_S = 600.0


def iterations(settings: dict, nbytes: int) -> int:
    """Calls per timed run: about run_bytes per run, between 10 and max_iters."""
    return max(10, min(settings["max_iters"], settings["run_bytes"] // nbytes))


def rank_main(rank: int, world: int, init_method: str, settings: dict, buffer_bytes: int,
              results: multiprocessing.Queue) -> None:
    """One rank: joins the group, then times every (op, size, repeat, backend) in the same
    order as the others; rank 0 reports the times."""
    try:
        import torch

        from shardline.distributed import parallel_state as ps
        from shardline.distributed.grid import RankGrid

        torch.set_num_threads(1)
        ps.init_distributed(RankGrid(tp=world), rank, init_method, "cpu",
                            shm_buffer_bytes=buffer_bytes)
        comm = ps.get_tp_group().comm
        segment = comm.shm
        times: dict[str, list[float]] = {}
        for op in OPS:
            for nbytes in settings["sizes"]:
                x = torch.randn(nbytes // 4)
                gathered = torch.empty(world * x.numel())
                iters = iterations(settings, nbytes)
                for _ in range(settings["repeats"]):
                    for backend in ("shm", "gloo"):
                        comm.shm = segment if backend == "shm" else None
                        if op == "all_reduce":
                            def call() -> None:
                                comm.all_reduce(x)
                        else:
                            def call() -> None:
                                comm.all_gather(x, 0, out=gathered)
                        for _ in range(3):
                            call()
                        comm.barrier()
                        start = time.perf_counter()
                        for _ in range(iters):
                            call()
                        elapsed = time.perf_counter() - start
                        times.setdefault(f"{op}/{nbytes}/{backend}", []).append(
                            elapsed / iters * 1e6)
        comm.shm = segment
        if rank == 0:
            results.put(("ok", times))
    except BaseException:
        results.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))
    finally:
        if "ps" in locals():
            ps.destroy_distributed()


def wait_for_result(results: multiprocessing.Queue, procs: list) -> tuple[str, object]:
    """Rank 0's report, or an error as soon as a rank died or TIMEOUT_S passed."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                return "error", ", ".join(f"rank {procs.index(p)} exited with code "
                                          f"{p.exitcode}" for p in dead)
    return "error", f"no result within {TIMEOUT_S:g} s"


def measure_world(world: int, settings: dict, buffer_bytes: int) -> dict[str, list[float]]:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_method = f"file://{tmp}/store"
        procs = [ctx.Process(target=rank_main, args=(rank, world, init_method, settings, buffer_bytes, results),
                             daemon=True) for rank in range(world)]
        for proc in procs:
            proc.start()
        try:
            status, value = wait_for_result(results, procs)
        finally:
            for proc in procs:
                proc.join(30)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
    if status != "ok":
        raise RuntimeError(f"world of {world} ranks failed: {value}")
    return value


def summarize(times: dict[str, list[float]], world: int) -> list[dict]:
    rows = []
    for key, samples in times.items():
        op, nbytes, backend = key.split("/")
        rows.append({"op": op, "world": world, "bytes_per_rank": int(nbytes), "backend": backend,
                     "us_median": statistics.median(samples), "us_repeats": samples})
    return rows


def speedups(rows: list[dict]) -> list[dict]:
    by_key = {(r["op"], r["world"], r["bytes_per_rank"], r["backend"]): r["us_median"]
              for r in rows}
    out = []
    for (op, world, nbytes, backend), us in by_key.items():
        if backend == "shm":
            gloo = by_key[(op, world, nbytes, "gloo")]
            out.append({"op": op, "world": world, "bytes_per_rank": nbytes, "shm_us": us,
                        "gloo_us": gloo, "speedup": gloo / us})
    return out


def targets(ratios: list[dict]) -> dict:
    out = {}
    for op in OPS:
        for world in WORLDS:
            worst = min(r["speedup"] for r in ratios if r["op"] == op and r["world"] == world)
            out[f"{op}_{world}_ranks_min_speedup"] = worst
    out["target_min_speedup"] = TARGET_SPEEDUP
    for op in OPS:
        out[f"{op}_target_met"] = all(out[f"{op}_{w}_ranks_min_speedup"] >= TARGET_SPEEDUP
                                      for w in WORLDS)
    return out


def plot(report: dict, path: Path) -> None:
    """Time per call against bytes per rank: one panel per op, shm solid, gloo dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(OPS), figsize=(11, 4.5), sharey=True)
    for ax, op in zip(axes, OPS):
        for world in WORLDS:
            for backend, style in (("shm", "o-"), ("gloo", "s--")):
                rows = [r for r in report["results"] if r["op"] == op and r["world"] == world
                        and r["backend"] == backend]
                ax.plot([r["bytes_per_rank"] for r in rows], [r["us_median"] for r in rows],
                        style, label=f"{backend}, {world} ranks")
        ax.set(xscale="log", yscale="log", xlabel="bytes per rank (fp32)", title=op)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("time per call, median (us)")
    axes[0].legend()
    cores = report["machine"]["cores_available"]
    fig.suptitle(f"Shared-memory collectives vs gloo ({report['mode']} run, {cores} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def collectives_machine_info() -> dict:
    import torch
    return machine_info("ranks share these cores with each other and with any other work on "
                        "the machine; 4 ranks on 2 cores oversubscribe them",
                        {"torch": torch.__version__})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two sizes, fewer repeats")
    parser.add_argument("--out", type=Path, default=RESULTS / "collectives.json",
                        help="JSON path; the plot goes beside it (default: %(default)s)")
    parser.add_argument("--shm-buffer-bytes", type=int, default=DEFAULT_BUFFER_BYTES,
                        help="staging bytes per rank, the piece size (default: %(default)s)")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    settings = SETTINGS[mode]
    report = {"command": " ".join(["python", *sys.argv]), "mode": mode,
              "settings": {**settings, "shm_buffer_bytes": args.shm_buffer_bytes},
              "machine": collectives_machine_info(), "results": []}
    print(f"{'op':<11} {'ranks':>5} {'bytes':>8} | {'shm us':>9} {'gloo us':>9} {'speedup':>8}")
    for world in WORLDS:
        rows = summarize(measure_world(world, settings, args.shm_buffer_bytes), world)
        report["results"] += rows
        for r in speedups(rows):
            print(f"{r['op']:<11} {world:>5} {r['bytes_per_rank']:>8} | {r['shm_us']:>9.1f} "
                  f"{r['gloo_us']:>9.1f} {r['speedup']:>7.1f}x", flush=True)
    report["speedups"] = speedups(report["results"])
    report["targets"] = targets(report["speedups"])
    report["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(json.dumps(report["targets"], indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
