"""Ring benchmark: shardline's MessageQueue against multiprocessing.Queue, multiprocessing.Pipe
and pyzmq, all doing the same broadcast round trip, plus the raw C++ handoff floor.

    python bench/ring.py            full run, about 2 minutes
    python bench/ring.py --quick    about 20 s

For every transport, 1 and 3 reader processes and payloads of 64 B to 1 MiB, the writer
broadcasts [seq, send_time_ns, wants_reply, payload] (payload: a uint8 numpy array); every
reader decodes it, notes the one-way latency (clock read after decoding) and replies
[seq, reader, one_way_ns] on its way back to the writer: a response MessageQueue per reader,
one shared multiprocessing.Queue, its own Pipe, or one PUSH/PULL socket behind PUB/SUB.

- round trip: from before the broadcast until every reader's reply is decoded;
- one-way: per (message, reader), from before the broadcast until the reader decoded it;
- throughput: messages sent back to back, only the last one answered; bytes are payload
  bytes delivered to each reader.
p50/p99 are medians over repeats of each repeat's percentile. Writes bench/results/ring.json
and ring.png and prints a table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np
import psutil
import zmq

from shardline import _shm
from shardline.ipc import MessageQueue

PAYLOADS = [64, 4096, 64 * 1024, 1024 * 1024]
READER_COUNTS = [1, 3]
STOP = -1
SPAWN = multiprocessing.get_context("spawn")
TIMEOUT_S = 30.0
RESULTS = Path(__file__).resolve().parent / "results"
# Per repeat: up to `round_trips` round trips and `stream` streamed messages, fewer for large
# payloads so that each phase moves at most `bytes` bytes (and at least 10 messages).
SETTINGS = {
    "quick": {"repeats": 3, "round_trips": 200, "stream": 1000, "bytes": 8 << 20, "idle_transports": ["shardline"]},
    "full": {"repeats": 7, "round_trips": 2000, "stream": 5000, "bytes": 64 << 20, "idle_transports": None},
}


def serve(recv, reply, index: int) -> None:
    """A reader's loop: receive, time, answer when asked, until the STOP message."""
    while True:
        seq, sent_ns, wants_reply, _payload = recv()
        one_way_ns = time.perf_counter_ns() - sent_ns
        if seq == STOP:
            return
        if wants_reply:
            reply([seq, index, one_way_ns])


def shardline_reader(handle, index: int, handle_pipe) -> None:
    with MessageQueue.attach(handle, index) as requests, MessageQueue.create(1) as responses:
        handle_pipe.send(responses.handle())
        responses.wait_attached(TIMEOUT_S)
        serve(lambda: requests.dequeue(TIMEOUT_S), responses.enqueue, index)


def queue_reader(requests, responses, index: int) -> None:
    serve(lambda: requests.get(timeout=TIMEOUT_S), responses.put, index)


def pipe_reader(conn, index: int) -> None:
    def recv():
        if not conn.poll(TIMEOUT_S):
            raise TimeoutError(f"reader {index}: no message in {TIMEOUT_S} s")
        return conn.recv()

    serve(recv, conn.send, index)


def zmq_reader(pub_address: str, pull_address: str, index: int) -> None:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.RCVTIMEO, int(TIMEOUT_S * 1000))
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(pub_address)
    push = ctx.socket(zmq.PUSH)
    push.connect(pull_address)

    def recv():
        header, payload = sub.recv_multipart(copy=False)
        return [*msgpack.unpackb(header.bytes), np.frombuffer(payload.buffer, np.uint8)]

    serve(recv, lambda answer: push.send(msgpack.packb(answer)), index)
    ctx.destroy(linger=0)


class Transport:
    """The writer's side of one transport with `n_readers` reader processes."""

    name: str

    def __init__(self, n_readers: int) -> None:
        self.n_readers = n_readers
        self.procs = []

    def broadcast(self, message: list) -> None:
        raise NotImplementedError

    def next_reply(self) -> list:
        raise NotImplementedError

    def gather(self, seq: int) -> list[int]:
        """One-way latencies of message `seq`, one per reader; older replies are dropped."""
        latencies = []
        while len(latencies) < self.n_readers:
            reply_seq, _reader, one_way_ns = self.next_reply()
            if reply_seq == seq:
                latencies.append(one_way_ns)
        return latencies

    def stop(self) -> None:
        self.broadcast([STOP, time.perf_counter_ns(), False, np.empty(0, np.uint8)])
        for proc in self.procs:
            proc.join(TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
        self.close()

    def close(self) -> None:
        pass

    def spawn(self, target, *args) -> None:
        proc = SPAWN.Process(target=target, args=args, daemon=True)
        proc.start()
        self.procs.append(proc)


class ShardlineTransport(Transport):
    name = "shardline"

    def __init__(self, n_readers: int) -> None:
        super().__init__(n_readers)
        self.requests = MessageQueue.create(n_readers, n_slots=64, slot_size=64 * 1024)
        pipes = [SPAWN.Pipe(duplex=False) for _ in range(n_readers)]
        for index, (_, sender) in enumerate(pipes):
            self.spawn(shardline_reader, self.requests.handle(), index, sender)
        self.responses = []
        for receiver, _ in pipes:
            if not receiver.poll(TIMEOUT_S):
                raise TimeoutError(f"no response-queue handle from a reader in {TIMEOUT_S} s")
            self.responses.append(MessageQueue.attach(receiver.recv(), 0))
        self.requests.wait_attached(TIMEOUT_S)
        self.next_reader = 0

    def broadcast(self, message: list) -> None:
        self.requests.enqueue(message, TIMEOUT_S)

    def next_reply(self) -> list:
        reply = self.responses[self.next_reader].dequeue(TIMEOUT_S)
        self.next_reader = (self.next_reader + 1) % self.n_readers
        return reply

    def close(self) -> None:
        for queue in [self.requests, *self.responses]:
            queue.close()


class QueueTransport(Transport):
    name = "mp.Queue"

    def __init__(self, n_readers: int) -> None:
        super().__init__(n_readers)
        self.requests = [SPAWN.Queue() for _ in range(n_readers)]
        self.responses = SPAWN.Queue()
        for index, queue in enumerate(self.requests):
            self.spawn(queue_reader, queue, self.responses, index)

    def broadcast(self, message: list) -> None:
        for queue in self.requests:
            queue.put(message)

    def next_reply(self) -> list:
        return self.responses.get(timeout=TIMEOUT_S)


class PipeTransport(Transport):
    name = "mp.Pipe"

    def __init__(self, n_readers: int) -> None:
        super().__init__(n_readers)
        self.conns = []
        for index in range(n_readers):
            mine, theirs = SPAWN.Pipe()
            self.spawn(pipe_reader, theirs, index)
            self.conns.append(mine)
        self.next_reader = 0

    def broadcast(self, message: list) -> None:
        for conn in self.conns:
            conn.send(message)

    def next_reply(self) -> list:
        conn = self.conns[self.next_reader]
        self.next_reader = (self.next_reader + 1) % self.n_readers
        if not conn.poll(TIMEOUT_S):
            raise TimeoutError(f"no reply from a Pipe reader in {TIMEOUT_S} s")
        return conn.recv()


class ZmqTransport(Transport):
    name = "pyzmq"

    def __init__(self, n_readers: int) -> None:
        super().__init__(n_readers)
        self.dir = tempfile.TemporaryDirectory(prefix="shardline-bench-")
        pub_address, pull_address = f"ipc://{self.dir.name}/pub", f"ipc://{self.dir.name}/pull"
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 0)
        self.pub.bind(pub_address)
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(pull_address)
        for index in range(n_readers):
            self.spawn(zmq_reader, pub_address, pull_address, index)
        self.subscribe_all()

    def subscribe_all(self) -> None:
        """Ping until every subscriber answered: PUB drops messages sent before a SUB joins."""
        answered, deadline = set(), time.monotonic() + TIMEOUT_S
        while len(answered) < self.n_readers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(answered)} of {self.n_readers} zmq readers joined")
            self.broadcast([0, time.perf_counter_ns(), True, np.empty(0, np.uint8)])
            while self.pull.poll(20):
                answered.add(msgpack.unpackb(self.pull.recv())[1])

    def broadcast(self, message: list) -> None:
        *header, payload = message
        self.pub.send_multipart([msgpack.packb(header), payload], copy=payload.nbytes < 65536)

    def next_reply(self) -> list:
        if not self.pull.poll(TIMEOUT_S * 1000):
            raise TimeoutError(f"no reply from a zmq reader in {TIMEOUT_S} s")
        return msgpack.unpackb(self.pull.recv())

    def close(self) -> None:
        self.ctx.destroy(linger=0)
        self.dir.cleanup()


TRANSPORTS = [ShardlineTransport, QueueTransport, PipeTransport, ZmqTransport]


def percentiles(samples: list[int]) -> tuple[float, float]:
    return float(np.percentile(samples, 50)), float(np.percentile(samples, 99))


def count(settings: dict, key: str, size: int) -> int:
    return max(10, min(settings[key], settings["bytes"] // size))


def measure(transport: Transport, size: int, settings: dict, seq: int) -> tuple[dict, int]:
    """Round trips then streaming of `size`-byte payloads; returns the results and next seq."""
    payload = np.random.default_rng().integers(0, 256, size, dtype=np.uint8)
    round_trip, one_way, rates = [], [], []
    for repeat in range(settings["repeats"] + 1):  # repeat 0 warms up
        rtts, ways = [], []
        for _ in range(count(settings, "round_trips", size)):
            seq += 1
            start = time.perf_counter_ns()
            transport.broadcast([seq, start, True, payload])
            ways += transport.gather(seq)
            rtts.append(time.perf_counter_ns() - start)
        n_stream = count(settings, "stream", size)
        start = time.perf_counter_ns()
        for i in range(n_stream):
            seq += 1
            transport.broadcast([seq, time.perf_counter_ns(), i == n_stream - 1, payload])
        transport.gather(seq)
        elapsed_s = (time.perf_counter_ns() - start) / 1e9
        if repeat:
            round_trip.append(percentiles(rtts))
            one_way.append(percentiles(ways))
            rates.append(n_stream / elapsed_s)
    msgs_per_s = statistics.median(rates)
    result = {
        "payload_bytes": size,
        "one_way_p50_us": statistics.median(p[0] for p in one_way) / 1e3,
        "one_way_p99_us": statistics.median(p[1] for p in one_way) / 1e3,
        "round_trip_p50_us": statistics.median(p[0] for p in round_trip) / 1e3,
        "round_trip_p99_us": statistics.median(p[1] for p in round_trip) / 1e3,
        "msgs_per_s": msgs_per_s,
        "gb_per_s": msgs_per_s * size / 1e9,
    }
    return result, seq


def idle_cpu_percent(pid: int, seconds: float = 2.0) -> float:
    """CPU use of a process waiting for a message, in percent of one core."""
    proc = psutil.Process(pid)
    time.sleep(0.2)  # let the reader pass its spin phase
    before = proc.cpu_times()
    time.sleep(seconds)
    after = proc.cpu_times()
    return 100.0 * ((after.user - before.user) + (after.system - before.system)) / seconds


def raw_handoff(settings: dict) -> list[dict]:
    """The C++ ring's one-way handoff with no Python in the loop: the floor."""
    results = []
    for size in PAYLOADS:
        slot_size = 4096 if size <= 1024 else 64 * 1024
        runs = [
            percentiles(_shm.raw_handoff_latency(size, count(settings, "stream", size), 64, slot_size))
            for _ in range(settings["repeats"])
        ]
        results.append({
            "payload_bytes": size,
            "slot_size": slot_size,
            "n_slots": 64,
            "one_way_p50_us": statistics.median(r[0] for r in runs) / 1e3,
            "one_way_p99_us": statistics.median(r[1] for r in runs) / 1e3,
        })
    return results


def machine_info() -> dict:
    cpu_model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )
    return {
        "cpu": cpu_model,
        "cores_available": len(os.sched_getaffinity(0)),
        "note": "all processes (writer, up to 3 readers) share these cores with other work on the machine",
        "load_average_at_start": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
        "pyzmq": zmq.__version__,
    }


def run(mode: str, transport_names: list[str]) -> dict:
    settings = SETTINGS[mode]
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "mode": mode,
        "settings": settings,
        "machine": machine_info(),
        "results": [],
        "idle_reader_cpu_percent": {},
    }
    idle_transports = settings["idle_transports"] or transport_names
    print_header()
    for cls in TRANSPORTS:
        if cls.name not in transport_names:
            continue
        for n_readers in READER_COUNTS:
            transport, seq = cls(n_readers), 0
            try:
                for size in PAYLOADS:
                    result, seq = measure(transport, size, settings, seq)
                    report["results"].append({"transport": cls.name, "n_readers": n_readers, **result})
                    print_row(report["results"][-1])
                if n_readers == 1 and cls.name in idle_transports:
                    idle = idle_cpu_percent(transport.procs[0].pid)
                    report["idle_reader_cpu_percent"][cls.name] = idle
                    print(f"{cls.name}: idle reader uses {idle:.2f}% of a core")
            finally:
                transport.stop()
    report["raw_cpp_one_way"] = raw_handoff(settings)
    for row in report["raw_cpp_one_way"]:
        print(f"raw C++ one-way {row['payload_bytes']:>8} B: p50 {row['one_way_p50_us']:.3f} us, "
              f"p99 {row['one_way_p99_us']:.3f} us")
    report["targets"] = targets(report)
    return report


def targets(report: dict) -> dict:
    def rtt(transport: str, n_readers: int) -> float | None:
        rows = [r for r in report["results"] if r["transport"] == transport
                and r["n_readers"] == n_readers and r["payload_bytes"] == 64]
        return rows[0]["round_trip_p50_us"] if rows else None

    out = {}
    for n_readers in READER_COUNTS:
        ours, zmq_rtt = rtt("shardline", n_readers), rtt("pyzmq", n_readers)
        if ours and zmq_rtt:
            out[f"pyzmq_over_shardline_round_trip_64B_{n_readers}_readers"] = zmq_rtt / ours
    out["raw_cpp_one_way_p50_64B_us"] = report["raw_cpp_one_way"][0]["one_way_p50_us"]
    if "shardline" in report["idle_reader_cpu_percent"]:
        out["idle_reader_cpu_percent"] = report["idle_reader_cpu_percent"]["shardline"]
    return out


def print_header() -> None:
    print(f"{'transport':<10} {'readers':>7} {'payload':>9} | {'one-way p50':>11} {'p99':>9} | "
          f"{'rtt p50':>9} {'p99':>9} (us) | {'msgs/s':>9} {'GB/s':>7}")


def print_row(row: dict) -> None:
    print(f"{row['transport']:<10} {row['n_readers']:>7} {row['payload_bytes']:>9} | "
          f"{row['one_way_p50_us']:>11.1f} {row['one_way_p99_us']:>9.1f} | "
          f"{row['round_trip_p50_us']:>9.1f} {row['round_trip_p99_us']:>9.1f}      | "
          f"{row['msgs_per_s']:>9.0f} {row['gb_per_s']:>7.3f}", flush=True)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(READER_COUNTS), figsize=(11, 4.5), sharey=True)
    for ax, n_readers in zip(axes, READER_COUNTS):
        for name in dict.fromkeys(r["transport"] for r in report["results"]):
            rows = [r for r in report["results"] if r["transport"] == name and r["n_readers"] == n_readers]
            ax.plot([r["payload_bytes"] for r in rows], [r["round_trip_p50_us"] for r in rows], "o-", label=name)
        raw = report["raw_cpp_one_way"]
        ax.plot([r["payload_bytes"] for r in raw], [r["one_way_p50_us"] for r in raw], "k--",
                label="raw C++ one-way")
        ax.set(xscale="log", yscale="log", xlabel="payload (bytes)", title=f"{n_readers} reader(s)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("round-trip p50 (us)")
    axes[0].legend()
    fig.suptitle(f"Broadcast round trip, {report['machine']['cores_available']} cores ({report['mode']} run)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~20 s run with fewer repeats")
    parser.add_argument("--transports", default=",".join(cls.name for cls in TRANSPORTS),
                        help="comma-separated subset of: %(default)s")
    args = parser.parse_args()
    report = run("quick" if args.quick else "full", args.transports.split(","))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ring.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, RESULTS / "ring.png")
    print(json.dumps(report["targets"], indent=2))
    print(f"wrote {RESULTS / 'ring.json'} and {RESULTS / 'ring.png'}")


if __name__ == "__main__":
    main()
