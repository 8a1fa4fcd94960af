"""The Ray node agent's own duties, without a cluster."""

from __future__ import annotations

import signal
import subprocess
import sys

from shardline.executor import ray_worker
from shardline.executor.proc_stat import start_time
from shardline.executor.ray_worker import NodeAgent


def test_the_stacks_signal_skips_a_rank_whose_pid_another_process_took(monkeypatch, rng):
    """The ranks are no children of the agent: once one has ended, its pid may name
    another process, which SIGUSR1 (its default action) would end. Here one recorded rank
    "has ended and its pid was reused" (its recorded start time is not the live process's):
    it gets no signal, the other rank does."""
    monkeypatch.setattr(ray_worker, "STACKS_GAP_S", 0.0)
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
             for _ in range(2)]
    reused = rng.randrange(2)
    try:
        agent = NodeAgent()
        agent.rank_pids = [proc.pid for proc in procs]
        agent.rank_start_times = [start_time(proc.pid) for proc in procs]
        agent.rank_start_times[reused] = str(int(agent.rank_start_times[reused]) - 1)
        agent.dump_stacks()
        assert procs[1 - reused].wait(timeout=30) == -signal.SIGUSR1
        assert procs[reused].poll() is None
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
