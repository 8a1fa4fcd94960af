"""The engine's own process killed with SIGKILL leaves nothing behind: its workers exit
within seconds (idle, or inside a call that would run for a minute), no segment of theirs
stays in /dev/shm, and the private rendezvous directory of their world is removed. For
stub workers at TP2 and DP2 (two cores sharing one directory), and for a real TP2 LLM
killed mid-generation."""

from __future__ import annotations

import glob
import os
import queue
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.process import BaseProcess

import pytest

from launcher import SPAWN
from process_hygiene import assert_gone, leaked_segments, shm_segments, wait_gone
from multiproc_helpers import WORLDS, make_config, start_world, step

from shardline.executor.data_parallel import _on_every_core

START_TIMEOUT_S = 120.0
HOLD_S = 60.0  # a call far longer than the time the workers have to notice the death
GONE_WITHIN_S = 5.0  # the target is 2 s; the rest is slack for a busy 2-core machine


def stub_engine(world: str, hold_dir: str | None, report) -> None:
    """An engine's process: starts `world` of stub workers, runs a few calls, reports its
    workers' pids and rendezvous directory, then waits to be killed: inside a call on
    every rank when `hold_dir` is given (each rank leaves a file there once in it), else
    with its workers idle."""
    executors = start_world(make_config(**WORLDS[world]))
    for executor in executors:
        assert executor.execute_model(step("a", "b")).req_ids == ["a", "b"]
        assert executor.collective_rpc("echo", args=(3,)) == [3] * executor.num_workers
    report.put(([pid for executor in executors for pid in executor.worker_pids],
                executors[0]._group.rendezvous.directory))
    if hold_dir is not None:
        _on_every_core(executors, lambda executor: executor.collective_rpc(
            "hold", args=(hold_dir, HOLD_S)))
    time.sleep(HOLD_S)


def generating_engine(prompt: list[int], report) -> None:
    """An engine's process: a TP2 LLM that generates without end (a new request whenever
    the last one finishes), and reports its workers once generation is under way."""
    from shardline import LLM, SamplingParams

    llm = LLM("tiny-llama", tensor_parallel_size=2, device="cpu", block_size=4,
              num_kv_blocks=256)
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    for n in range(10**9):
        if not llm.has_unfinished_requests():
            llm.add_request(f"r{n}", prompt, params)
        llm.step()
        if n == 3:
            executor = llm.engine.executor
            report.put((executor.worker_pids, executor._group.rendezvous.directory))


@contextmanager
def engine_process(target: Callable[..., None], *args: object
                   ) -> Iterator[tuple[BaseProcess, list[int], str]]:
    """`target(*args, report)` in a spawned process (not a daemon, which could not start
    workers), with its worker pids and rendezvous directory once it reported them. At the
    end the process and any worker of it still running are killed."""
    report = SPAWN.Queue()
    engine = SPAWN.Process(target=target, args=(*args, report), name="engine")
    engine.start()
    pids: list[int] = []
    try:
        try:
            pids, directory = report.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            raise AssertionError(f"the engine did not start its workers within "
                                 f"{START_TIMEOUT_S} s (exit code {engine.exitcode})") from None
        assert os.path.dirname(directory) == tempfile.gettempdir(), directory
        assert os.path.basename(directory).startswith("shardline-rendezvous-")
        assert os.path.isdir(directory)
        yield engine, pids, directory
    finally:
        engine.kill()
        engine.join(10)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        report.close()


def kill_engine(engine: BaseProcess, pids: list[int], directory: str,
                segments_before: set[str], what: str) -> float:
    """SIGKILL `engine`, then check that its workers `pids` exit within GONE_WITHIN_S and
    leave no segment and no rendezvous `directory`; the seconds until the last was gone."""
    os.kill(engine.pid, signal.SIGKILL)
    gone = wait_gone(pids, 30.0)
    print(f"{what}: the last worker was gone {gone:.3f} s after the engine's SIGKILL")
    engine.join(10)
    assert engine.exitcode == -signal.SIGKILL
    assert_gone(pids)
    assert gone < GONE_WITHIN_S
    left = glob.glob(glob.escape(directory) + "*")
    assert not left, f"the rendezvous directory was left behind: {left}"
    assert not leaked_segments(segments_before)
    return gone


@pytest.mark.parametrize("world", list(WORLDS))
@pytest.mark.parametrize("busy", [False, True], ids=["idle", "mid-call"])
def test_a_killed_engine_leaves_no_worker_segment_or_rendezvous(world, busy, tmp_path):
    before = shm_segments()
    hold_dir = str(tmp_path) if busy else None
    with engine_process(stub_engine, world, hold_dir) as (engine, pids, directory):
        if busy:
            deadline = time.monotonic() + 30
            while len(os.listdir(tmp_path)) < len(pids):
                assert time.monotonic() < deadline, "the ranks never entered the call"
                time.sleep(0.01)
        kill_engine(engine, pids, directory, before, f"{world} {'busy' if busy else 'idle'}")


def test_a_tp2_llm_killed_mid_generation_leaves_nothing(rng):
    before = shm_segments()
    prompt = [rng.randrange(3, 259) for _ in range(rng.randint(4, 12))]
    with engine_process(generating_engine, prompt) as (engine, pids, directory):
        time.sleep(rng.uniform(0.0, 0.2))
        assert engine.is_alive()
        kill_engine(engine, pids, directory, before, "TP2 LLM generating")
