"""What the multi-process executor leaves behind, with model-free stub workers in spawned
processes: a shutdown, garbage collection, a with block, interpreter exit or Ctrl-C leave
no process, nothing in /dev/shm and no rendezvous file; the ranks' rendezvous (one
executor's, or data-parallel cores' shared one) is private to their world."""

from __future__ import annotations

import gc
import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import psutil
import pytest

from shardline.executor import EngineDeadError
from shardline.executor.data_parallel import _on_every_core, create_data_parallel_executors
from shardline.executor.multiproc import DEAD_GRACE_S, MultiProcExecutor
from shardline.executor.worker_proc import ANSWER_POLL_S
from multiproc_helpers import WORLDS, make_config, start_world
from process_hygiene import assert_gone, leaked_segments, live_children, shm_segments
from stub_workers import TIME_FILE_ENV


def test_shutdown_garbage_collection_and_a_with_block_leave_nothing_behind(make_executor):
    before = shm_segments()
    executor = make_executor(tensor_parallel_size=2)
    pids = executor.worker_pids
    executor.shutdown()
    executor.shutdown()
    assert_gone(pids)
    with pytest.raises(EngineDeadError, match="shut down"):
        executor.collective_rpc("identity")
    dropped = MultiProcExecutor(make_config(tensor_parallel_size=2))
    pids = dropped.worker_pids
    del dropped
    gc.collect()
    assert_gone(pids)
    with pytest.raises(KeyError, match="leaves the block"):
        with MultiProcExecutor(make_config(tensor_parallel_size=2)) as scoped:
            pids = scoped.worker_pids
            assert scoped.collective_rpc("echo", args=(1,)) == [1, 1]
            raise KeyError("leaves the block")
    assert_gone(pids)
    with pytest.raises(EngineDeadError, match="shut down"):
        scoped.collective_rpc("identity")
    assert not leaked_segments(before)


def test_shutdown_frees_the_log_queues_semaphores_at_once(make_executor):
    """The log relay's queue holds three named semaphores in /dev/shm; they stayed there
    after shutdown until the executor itself was collected."""
    executor = make_executor(tensor_parallel_size=2)
    queue = executor._group.log_queue
    names = [f"sem.{lock._semlock.name.lstrip('/')}"
             for lock in (queue._rlock, queue._wlock, queue._sem)]
    assert all(os.path.exists(f"/dev/shm/{name}") for name in names)
    del queue
    executor.shutdown()
    assert not [name for name in names if os.path.exists(f"/dev/shm/{name}")]


@pytest.fixture
def rendezvous_dirs(monkeypatch) -> list[str]:
    """The directories the executors of this test make with tempfile.mkdtemp."""
    made: list[str] = []
    mkdtemp = tempfile.mkdtemp

    def recording(*args, **kwargs) -> str:
        made.append(mkdtemp(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", recording)
    return made


def check_rendezvous(executors: list[MultiProcExecutor], rng) -> str:
    """The ranks of `executors` (one world) met at one file store in a private directory
    and reduce over it together; that directory."""
    urls = [url for executor in executors for url in executor.collective_rpc("rendezvous",
                                                                              timeout=60)]
    assert len(set(urls)) == 1 and urls[0].startswith("file://"), urls
    path = urls[0].removeprefix("file://")
    assert os.path.exists(path)
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    values = [rng.uniform(-100, 100) for _ in urls]
    sums = _on_every_core(executors, lambda executor: executor.collective_rpc(
        "all_reduce", args=(values,), timeout=60))
    assert sum(sums, []) == pytest.approx([sum(values)] * len(values), rel=1e-12)
    return os.path.dirname(path)


@pytest.mark.parametrize("end", ["shutdown", "killed-worker", "garbage-collected"])
def test_ranks_rendezvous_at_a_private_file_removed_with_the_executor(rendezvous_dirs, rng,
                                                                      end):
    executor = MultiProcExecutor(make_config("rendezvous_worker.RendezvousWorker",
                                             tensor_parallel_size=2))
    pids = executor.worker_pids
    try:
        where = check_rendezvous([executor], rng)
        assert rendezvous_dirs == [where]
        if end == "killed-worker":
            os.kill(pids[1], signal.SIGKILL)
            with pytest.raises(EngineDeadError, match=r"worker rank 1 .* exit code -9"):
                executor.collective_rpc("sleep", args=(0,), timeout=30)
        if end == "garbage-collected":
            del executor
            gc.collect()
            assert not os.path.exists(where)
    finally:
        if end != "garbage-collected":
            executor.shutdown()
    assert_gone(pids)
    assert not os.path.exists(where)


@pytest.mark.parametrize("end", ["shutdown", "killed-worker", "garbage-collected"])
def test_data_parallel_cores_share_one_rendezvous_removed_by_the_last(rendezvous_dirs, rng,
                                                                     end):
    """DP2: both cores' ranks meet in one world at one private file store, which outlives
    the first core to shut down (the dead one, after a kill) and goes with the last."""
    config = make_config("rendezvous_worker.RendezvousWorker", data_parallel_size=2)
    cores = list(create_data_parallel_executors(config))  # not the list the cores' links see
    pids = [pid for core in cores for pid in core.worker_pids]
    try:
        where = check_rendezvous(cores, rng)
        assert rendezvous_dirs == [where]
        if end == "killed-worker":
            os.kill(pids[1], signal.SIGKILL)
            with pytest.raises(EngineDeadError, match=r"worker rank 1 .* exit code -9"):
                cores[1].collective_rpc("sleep", args=(0,), timeout=30)
            cores.reverse()
        if end == "garbage-collected":
            cores.clear()
            gc.collect()
        else:
            cores[0].shutdown()
            assert os.path.isdir(where)
            cores[1].shutdown()
    finally:
        for core in cores:
            core.shutdown()
    assert not os.path.exists(where)
    assert_gone(pids)


@pytest.mark.parametrize("world", list(WORLDS))
def test_a_failed_start_leaves_no_rendezvous_file(rendezvous_dirs, world):
    with pytest.raises(RuntimeError, match=r"init_device failed on worker rank 1: "
                                           r"RuntimeError: init_device failed on purpose"):
        start_world(make_config("rendezvous_worker.FailingRendezvousWorker", **WORLDS[world]))
    assert len(rendezvous_dirs) == 1 and not os.path.exists(rendezvous_dirs[0])


def test_a_dead_ranks_survivors_stuck_in_a_call_are_not_waited_for(monkeypatch, tmp_path):
    """Rank 1 dies in init_device while rank 0 waits there for it: the start fails with
    EngineDeadError naming rank 1 about DEAD_GRACE_S after the death (rank 0, which no
    call can reach any more, is killed then), not after the SHUTDOWN_GRACE_S (5 s) that a
    serving worker gets to finish its call. Nothing is left running."""
    noted = tmp_path / "time"
    monkeypatch.setenv(TIME_FILE_ENV, str(noted))
    with pytest.raises(EngineDeadError, match=r"worker rank 1 \(pid \d+\) died with exit code 5"):
        MultiProcExecutor(make_config("DiesInInitWorker", tensor_parallel_size=2))
    elapsed = time.monotonic() - float(noted.read_text())
    print(f"the failed start raised {elapsed:.2f} s after rank 1 died")
    assert elapsed < DEAD_GRACE_S + 2.0
    assert not live_children()


def test_a_rank_failing_a_setup_call_fails_the_start_without_waiting(monkeypatch, tmp_path):
    """Rank 1's init_device raises while rank 0 waits there for it: the executor gives its
    workers up as dead, so the start fails with rank 1's error within ANSWER_POLL_S +
    DEAD_GRACE_S, where shutting down a serving group gave rank 0 SHUTDOWN_GRACE_S (5 s)
    to leave a call it cannot leave. Nothing is left running."""
    noted = tmp_path / "time"
    monkeypatch.setenv(TIME_FILE_ENV, str(noted))
    with pytest.raises(RuntimeError, match=r"^init_device failed on worker rank 1: RuntimeError: "
                                           r"init_device failed on purpose"):
        MultiProcExecutor(make_config("FailsInInitWorker", tensor_parallel_size=2))
    elapsed = time.monotonic() - float(noted.read_text())
    print(f"the failed start raised {elapsed:.2f} s after rank 1 failed")
    assert elapsed < ANSWER_POLL_S + DEAD_GRACE_S + 2.0
    assert not live_children()


def test_a_given_init_method_is_used_as_is_and_left_alone(rendezvous_dirs, tmp_path, rng):
    url = f"file://{tmp_path}/store"
    executor = MultiProcExecutor(make_config("rendezvous_worker.RendezvousWorker",
                                             tensor_parallel_size=2),
                                 distributed_init_method=url)
    try:
        assert check_rendezvous([executor], rng) == str(tmp_path)
    finally:
        executor.shutdown()
    assert rendezvous_dirs == [] and tmp_path.is_dir()


def test_executors_started_at_once_each_meet_in_their_own_world(make_executor, rng):
    """Two executors starting together rendezvous apart (each reduces only its own ranks'
    values). No test forces the old TCP port race (a port probed free, closed, and taken
    by another process before rank 0 binds it): it needs a third party in that window."""
    executors: list[MultiProcExecutor] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            executors.append(make_executor("rendezvous_worker.RendezvousWorker",
                                           tensor_parallel_size=2))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors and len(executors) == 2
    assert len({check_rendezvous([executor], rng) for executor in executors}) == 2


_EXIT_SCRIPT = """
import os, signal, sys, time
sys.path[:0] = [{stub_dir!r}, {tests_dir!r}]
from multiproc_helpers import WORLDS, make_config, start_world
executors = start_world(make_config(**WORLDS[{world!r}]))
print(" ".join(str(pid) for executor in executors for pid in executor.worker_pids), flush=True)
print(executors[0]._group.rendezvous.directory, flush=True)
if {interrupt}:
    executors[0].collective_rpc("hold", args=({hold_dir!r}, 60))
sys.stdin.readline()  # exits once the test has seen the rendezvous directory
"""


@pytest.mark.parametrize("world", list(WORLDS))
@pytest.mark.parametrize("interrupt", [False, True], ids=["interpreter-exit", "ctrl-c"])
def test_interpreter_exit_and_ctrl_c_leave_no_worker_and_no_rendezvous(interrupt, world,
                                                                       tmp_path):
    """The script waits for the test before it exits (else its exit may remove the
    rendezvous directory before the test has seen it, as on a loaded machine), and is
    interrupted once core 0's ranks are all inside a call."""
    before = shm_segments()
    here = os.path.dirname(__file__)
    script = _EXIT_SCRIPT.format(stub_dir=here, tests_dir=os.path.dirname(here),
                                 world=world, interrupt=interrupt, hold_dir=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2, proc.stderr.read()
        rendezvous_dir = proc.stdout.readline().strip()
        assert os.path.isdir(rendezvous_dir)
        if interrupt:
            holding = len(pids) // WORLDS[world].get("data_parallel_size", 1)
            deadline = time.monotonic() + 30
            while len(os.listdir(tmp_path)) < holding:
                assert time.monotonic() < deadline, "core 0's ranks never entered the call"
                time.sleep(0.01)
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
        proc.stdin.close()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(psutil.pid_exists(p) for p in pids)
    assert not os.path.exists(rendezvous_dir)
    if interrupt:
        assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr.read()
    assert not leaked_segments(before)


def test_shutdown_removes_the_ring_a_killed_worker_left_unattached(make_executor):
    """A worker killed between creating its response ring and the executor attaching it
    (a start cut short, as by a SIGTERM while `serve` loads) left the ring's name in
    /dev/shm until the next ring created on the machine. A shutdown now sweeps it: here a
    writer killed before anyone attached its ring stands in for that worker."""
    from launcher import SPAWN, spawn
    from shm_helpers import TIMEOUT, expect_event, idle_writer, shm_path
    executor = make_executor(tensor_parallel_size=2)
    events = SPAWN.Queue()
    writer = spawn(idle_writer, events)
    name = expect_event(events, "name")
    writer.kill()
    writer.join(TIMEOUT)
    try:
        assert os.path.exists(shm_path(name))
        executor.shutdown()
        assert not os.path.exists(shm_path(name))
    finally:
        if os.path.exists(shm_path(name)):
            os.unlink(shm_path(name))
