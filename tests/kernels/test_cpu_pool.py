"""The CPU kernels' worker threads (csrc/cpu/thread_pool.cpp): started once and reused,
correct under many calls, concurrent calls, an exception and fork."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from checks import assert_close, paged_cache
from test_cpu_attention import LAYOUTS, TOLERANCE, expected_output

from shardline.kernels import cpu_attention

pytestmark = pytest.mark.usefixtures("fresh_seed")


def random_call(rng):
    """A decode call of random layout, dtype, batch and lengths, its expected output, and a
    thread count from 1 to 5."""
    num_kv_heads, group, head_dim, block_size = rng.choice(LAYOUTS)
    dtype = rng.choice(list(cpu_attention.DTYPES))
    lengths = [rng.randint(0, 200) for _ in range(rng.randint(1, 6))]
    k_cache, v_cache, block_tables = paged_cache(lengths, num_kv_heads, head_dim, block_size,
                                                 dtype, "cpu")
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    q = torch.randn(len(lengths), num_kv_heads * group, head_dim, dtype=dtype)
    args = (q, k_cache, v_cache, block_tables, seq_lens, head_dim ** -0.5)
    return args, expected_output(*args), rng.randint(1, 5)


def test_many_calls_on_any_thread_count_match_the_reference(rng):
    """Calls of fresh shapes, one after another on the same workers, each thread count
    from 1 to 5 (more ranges than workers started so far, and fewer)."""
    for _ in range(40):
        args, expected, threads = random_call(rng)
        out = cpu_attention.paged_decode_attention(*args, threads=threads)
        assert_close(out, expected, TOLERANCE)


def test_calls_from_several_python_threads_at_once(rng):
    """Four Python threads call the kernel at the same time (it releases the GIL): one has
    the workers, the others run their ranges themselves; every result is right."""
    calls = [[random_call(rng) for _ in range(15)] for _ in range(4)]
    start = threading.Barrier(len(calls))
    failures = []

    def run(own_calls):
        start.wait()
        for args, expected, threads in own_calls:
            try:
                assert_close(cpu_attention.paged_decode_attention(*args, threads=threads),
                             expected, TOLERANCE)
            except AssertionError as error:
                failures.append(error)

    workers = [threading.Thread(target=run, args=(own,)) for own in calls]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert not any(worker.is_alive() for worker in workers), "a call never returned"
    assert not failures, failures[0]


# Run in a fresh process, so that no earlier test has started workers. Prints the checks'
# results; the test reads them.
_POOL_SCRIPT = """
import os, resource, sys, threading, torch
from checks import paged_cache
from test_cpu_attention import expected_output
from shardline.kernels import cpu_attention

torch.manual_seed(int(sys.argv[1]))
lengths = [int(sys.argv[2])] * 6  # equal: a call on n threads splits into n ranges
k_cache, v_cache, tables = paged_cache(lengths, 2, 64, 16, torch.float32, "cpu")
q, seq_lens = torch.randn(len(lengths), 4, 64), torch.tensor(lengths, dtype=torch.int32)
expected = expected_output(q, k_cache, v_cache, tables, seq_lens, 0.125)


def call(threads):
    out = cpu_attention.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.125,
                                               threads=threads)
    assert (out - expected).abs().max() < 1e-5, "wrong output"


def threads_now():
    return set(os.listdir("/proc/self/task"))


before = threads_now()
call(3)
after_first = threads_now()
print("started by a first call on 3 threads:", len(after_first - before))
for threads in (2, 3, 1, 2, 3) * 10:
    call(threads)
print("started by 50 more on 1-3:", len(threads_now() - after_first))
call(5)
print("started by a call on 5:", len(threads_now() - after_first))

# An exception in the ranges: every range's scratch space (num_heads * block_size floats)
# is more than the address space has left. It reaches the caller; the workers stay usable.
big_q = torch.randn(4, 64, 1)
big_cache = torch.randn(1, 1 << 19, 1, 1)
size = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
            if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (size + (16 << 20), resource.RLIM_INFINITY))
try:
    cpu_attention.paged_decode_attention(big_q, big_cache, big_cache,
                                         torch.zeros(4, 1, dtype=torch.int32),
                                         torch.full((4,), 1 << 19, dtype=torch.int32), 1.0,
                                         threads=4)
    print("raised: nothing")
except MemoryError:
    print("raised: MemoryError")
resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
for threads in (4, 2, 5):
    call(threads)
print("after the exception, right on 2-5 threads")

# A forked child has none of the parent's workers: it starts its own. The parent forks
# while one of its threads is calling the kernel, so the workers may be mid-call.
stop = threading.Event()


def keep_calling():
    while not stop.is_set():
        call(4)


caller = threading.Thread(target=keep_calling)
caller.start()
read_end, write_end = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        before = threads_now()
        call(3)
        call(5)
        os.write(write_end, f"{len(threads_now() - before)}".encode())
    finally:
        os._exit(0)
stop.set()
caller.join()
_, status = os.waitpid(pid, 0)
print("child exit status:", status, "started in the child:", os.read(read_end, 16).decode())
"""


def test_workers_start_once_and_survive_an_exception_and_fork(tmp_path, fresh_seed):
    """In a fresh process: a first call on 3 threads starts 2 workers and 50 more calls on
    1-3 threads start none; a call on 5 starts 2 more. An exception thrown in the ranges
    (scratch space the address space cannot hold) reaches the caller as MemoryError and
    later calls are still right. A child forked while the parent is mid-call computes the
    right output on workers of its own, and the process exits with its workers asleep."""
    script = tmp_path / "pool.py"
    script.write_text(_POOL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    length = str(torch.randint(40, 300, ()).item())
    done = subprocess.run([sys.executable, str(script), str(fresh_seed), length],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [
        "started by a first call on 3 threads: 2",
        "started by 50 more on 1-3: 0",
        "started by a call on 5: 2",
        "raised: MemoryError",
        "after the exception, right on 2-5 threads",
        "child exit status: 0 started in the child: 4",
    ], done.stderr[-3000:]
