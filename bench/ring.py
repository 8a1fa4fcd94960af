"""Ring benchmark: shardline's MessageQueue against multiprocessing.Queue, multiprocessing.Pipe,
pyzmq and, when vllm is importable, vLLM's shm MessageQueue, doing the same broadcast round
trip; plus the raw C++ handoff as the floor.

    python bench/ring.py            full run, about 5 minutes on 2 cores
    python bench/ring.py --quick    under a minute

For 1 and 3 reader processes and payloads of 64 B to 1 MiB (see ring_transports.py):
- one-way p50/p99: per (message, reader), from before the send until the reader decoded it;
- round trip p50/p99: from before the send until every reader's reply is decoded;
- msgs/s and GB/s: messages sent back to back, only the last one answered; GB/s counts
  payload bytes delivered to each reader;
- the CPU use of an idle reader blocked in its receive, over 2 s;
- the raw C++ one-way handoff (`shardline._shm.raw_handoff_latency`, no Python).
Each number is the median over repeats; transports take turns within every repeat so that
drifting machine load hits them alike. Writes bench/results/ring.json and ring.png.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import psutil
import zmq
from _machine import machine_info
from ring_transports import TRANSPORTS, Transport

from shardline import _shm

# (type, bytes): a uint8 numpy array travels out of band in shardline's serializer; 64 B also
# as `bytes`, the shape of a small control message (plain msgpack, no out-of-band buffer).
PAYLOADS = [("bytes", 64), ("array", 64), ("array", 4096), ("array", 64 * 1024), ("array", 1 << 20)]
RAW_PAYLOADS = [64, 4096, 64 * 1024, 1 << 20]
READER_COUNTS = [1, 3]
RESULTS = Path(__file__).resolve().parent / "results"
# Per repeat: `round_trips` round trips and `stream` streamed messages, fewer for large
# payloads so that each phase moves at most `bytes` bytes (but at least 10 messages).
SETTINGS = {
    "quick": {"repeats": 3, "round_trips": 100, "stream": 500, "bytes": 4 << 20},
    "full": {"repeats": 5, "round_trips": 1000, "stream": 2000, "bytes": 32 << 20},
}
IDLE_SECONDS = 2.0


def count(settings: dict, key: str, size: int) -> int:
    return max(10, min(settings[key], settings["bytes"] // size))


def percentiles(samples: list[int]) -> tuple[float, float]:
    return float(np.percentile(samples, 50)), float(np.percentile(samples, 99))


def measure_once(transport: Transport, payload: bytes | np.ndarray, settings: dict) -> dict:
    """One repeat: round trips, then a stream of messages of which only the last is answered."""
    size, rtts, one_way = len(payload), [], []
    for _ in range(count(settings, "round_trips", size)):
        transport.seq += 1
        start = time.perf_counter_ns()
        transport.broadcast([transport.seq, start, True, payload])
        one_way += transport.gather(transport.seq)
        rtts.append(time.perf_counter_ns() - start)
    n_stream = count(settings, "stream", size)
    start = time.perf_counter_ns()
    for i in range(n_stream):
        transport.seq += 1
        transport.broadcast([transport.seq, time.perf_counter_ns(), i == n_stream - 1, payload])
    transport.gather(transport.seq)
    rate = n_stream / ((time.perf_counter_ns() - start) / 1e9)
    return {"rtt": percentiles(rtts), "one_way": percentiles(one_way), "rate": rate}


def summarize(repeats: list[dict]) -> dict:
    """Medians over repeats of each repeat's p50, p99 and rate."""

    def median_us(key: str, index: int) -> float:
        return statistics.median(r[key][index] for r in repeats) / 1e3

    msgs_per_s = statistics.median(r["rate"] for r in repeats)
    return {
        "one_way_p50_us": median_us("one_way", 0),
        "one_way_p99_us": median_us("one_way", 1),
        "round_trip_p50_us": median_us("rtt", 0),
        "round_trip_p99_us": median_us("rtt", 1),
        "msgs_per_s": msgs_per_s,
    }


def idle_cpu_percent(pids: list[int]) -> list[float]:
    """CPU use of processes waiting for a message, in percent of one core, in one window."""
    procs = [psutil.Process(pid) for pid in pids]
    time.sleep(0.2)  # past any spin phase of their waits
    before = [proc.cpu_times() for proc in procs]
    time.sleep(IDLE_SECONDS)
    after = [proc.cpu_times() for proc in procs]
    return [
        100.0 * ((a.user - b.user) + (a.system - b.system)) / IDLE_SECONDS
        for a, b in zip(after, before)
    ]


def measure_transports(selected: list[type[Transport]], n_readers: int, settings: dict,
                       report: dict) -> None:
    transports: list[Transport] = []
    try:
        for cls in selected:
            transports.append(cls(n_readers))
        for payload_type, size in PAYLOADS:
            payload = np.random.default_rng().integers(0, 256, size, dtype=np.uint8)
            if payload_type == "bytes":
                payload = payload.tobytes()
            repeats = {t.name: [] for t in transports}
            for repeat in range(settings["repeats"] + 1):  # repeat 0 warms up
                for transport in transports:
                    sample = measure_once(transport, payload, settings)
                    if repeat:
                        repeats[transport.name].append(sample)
            for transport in transports:
                row = {"transport": transport.name, "n_readers": n_readers,
                       "payload_type": payload_type, "payload_bytes": size}
                row.update(summarize(repeats[transport.name]))
                row["gb_per_s"] = row["msgs_per_s"] * size / 1e9
                report["results"].append(row)
                print_row(row)
        if n_readers == 1:
            idle = idle_cpu_percent([transport.procs[0].pid for transport in transports])
            for transport, percent in zip(transports, idle):
                report["idle_reader_cpu_percent"][transport.name] = percent
                print(f"{transport.name}: an idle reader uses {percent:.2f}% of a core")
    finally:
        for transport in transports:
            transport.stop()


def raw_handoff(settings: dict) -> list[dict]:
    """The C++ ring's one-way handoff with no Python in the loop: the floor."""
    results = []
    for size in RAW_PAYLOADS:
        slot_size = 4096 if size <= 1024 else 64 * 1024
        iterations = count(settings, "stream", size)
        runs = [
            percentiles(_shm.raw_handoff_latency(size, iterations, 64, slot_size))
            for _ in range(settings["repeats"])
        ]
        results.append({
            "payload_bytes": size,
            "n_slots": 64,
            "slot_size": slot_size,
            "one_way_p50_us": statistics.median(r[0] for r in runs) / 1e3,
            "one_way_p99_us": statistics.median(r[1] for r in runs) / 1e3,
        })
        print(f"raw C++ one-way {size:>8} B: p50 {results[-1]['one_way_p50_us']:.3f} us, "
              f"p99 {results[-1]['one_way_p99_us']:.3f} us")
    return results


def ring_machine_info() -> dict:
    return machine_info(
        "the writer and all readers share these cores with any other work on the machine; "
        "see the load averages",
        {"numpy": np.__version__, "msgpack": ".".join(map(str, msgpack.version)),
         "pyzmq": zmq.__version__, "vllm": optional_version("vllm"),
         "shm_extension": _shm.__file__})


def optional_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def targets(report: dict) -> dict:
    """The ratios the rings are judged by (see bench/README.md)."""

    def rtt(transport: str, n_readers: int, payload_type: str) -> float | None:
        key = (transport, n_readers, payload_type, 64)
        for r in report["results"]:
            if (r["transport"], r["n_readers"], r["payload_type"], r["payload_bytes"]) == key:
                return r["round_trip_p50_us"]
        return None

    out = {}
    for n_readers in READER_COUNTS:
        for payload_type in ("bytes", "array"):
            ours = rtt("shardline", n_readers, payload_type)
            theirs = rtt("pyzmq", n_readers, payload_type)
            if ours and theirs:
                key = f"pyzmq_over_shardline_round_trip_p50_64B_{payload_type}_{n_readers}_readers"
                out[key] = theirs / ours
    out["raw_cpp_one_way_p50_64B_us"] = report["raw_cpp_one_way"][0]["one_way_p50_us"]
    if "shardline" in report["idle_reader_cpu_percent"]:
        out["idle_reader_cpu_percent_of_a_core"] = report["idle_reader_cpu_percent"]["shardline"]
    return out


def print_header() -> None:
    print(f"{'transport':<10} {'readers':>7} {'payload':>15} | {'one-way p50':>11} {'p99':>9} | "
          f"{'rtt p50':>9} {'p99':>9} (us) | {'msgs/s':>9} {'GB/s':>7}")


def print_row(row: dict) -> None:
    payload = f"{row['payload_bytes']} B {row['payload_type']}"
    print(f"{row['transport']:<10} {row['n_readers']:>7} {payload:>15} | "
          f"{row['one_way_p50_us']:>11.1f} {row['one_way_p99_us']:>9.1f} | "
          f"{row['round_trip_p50_us']:>9.1f} {row['round_trip_p99_us']:>9.1f}      | "
          f"{row['msgs_per_s']:>9.0f} {row['gb_per_s']:>7.3f}", flush=True)


def plot(report: dict, path: Path) -> None:
    """Round-trip p50 by payload, one line per transport (arrays) and an x for 64 B bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(READER_COUNTS), figsize=(11, 4.5), sharey=True)
    raw = report["raw_cpp_one_way"]
    for ax, n_readers in zip(axes, READER_COUNTS):
        for name in dict.fromkeys(r["transport"] for r in report["results"]):
            rows = [r for r in report["results"]
                    if r["transport"] == name and r["n_readers"] == n_readers]
            arrays = [r for r in rows if r["payload_type"] == "array"]
            line, = ax.plot([r["payload_bytes"] for r in arrays],
                            [r["round_trip_p50_us"] for r in arrays], "o-", label=name)
            small = [r for r in rows if r["payload_type"] == "bytes"]
            ax.plot([r["payload_bytes"] for r in small], [r["round_trip_p50_us"] for r in small],
                    "x", markersize=10, color=line.get_color())
        ax.plot([r["payload_bytes"] for r in raw], [r["one_way_p50_us"] for r in raw], "k--",
                label="raw C++ one-way")
        ax.set(xscale="log", yscale="log", xlabel="payload (bytes; x: 64 B as bytes)",
               title=f"{n_readers} reader{'s' if n_readers > 1 else ''}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("round-trip p50 (us)")
    axes[0].legend()
    cores = report["machine"]["cores_available"]
    fig.suptitle(f"Broadcast round trip, p50 ({report['mode']} run, {cores} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    names = [cls.name for cls in TRANSPORTS]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repeats")
    parser.add_argument("--out", type=Path, default=RESULTS / "ring.json",
                        help="JSON path; the plot goes beside it (default: %(default)s)")
    parser.add_argument("--transports", default=",".join(names),
                        help="comma-separated subset of: %(default)s")
    args = parser.parse_args()
    unknown = set(args.transports.split(",")) - set(names)
    if unknown:
        parser.error(f"unknown transports {sorted(unknown)}: choose from {names}")
    mode = "quick" if args.quick else "full"
    pythonpath = [f"PYTHONPATH={os.environ['PYTHONPATH']}"] if "PYTHONPATH" in os.environ else []
    report = {
        "command": " ".join([*pythonpath, "python", *sys.argv]),
        "mode": mode,
        "settings": SETTINGS[mode],
        "machine": ring_machine_info(),
        "results": [],
        "idle_reader_cpu_percent": {},
        "idle_reader_cpu_note": f"psutil counts CPU time in 10 ms ticks: one tick over "
                                f"{IDLE_SECONDS:g} s reads as {1.0 / IDLE_SECONDS:g}%",
    }
    selected = [cls for cls in TRANSPORTS if cls.name in args.transports.split(",")]
    print_header()
    for n_readers in READER_COUNTS:
        measure_transports(selected, n_readers, SETTINGS[mode], report)
    report["raw_cpp_one_way"] = raw_handoff(SETTINGS[mode])
    report["targets"] = targets(report)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(json.dumps(report["targets"], indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
