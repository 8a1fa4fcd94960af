"""The multi-process executor's calls, with model-free stub workers in spawned processes:
replies per rank, the output rank, steps in flight, errors, timeouts, dead workers, the
workers' logs, threads and KV cache shapes. Shutdown and the ranks' rendezvous are in
test_multiproc_cleanup.py."""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time

import psutil
import pytest

from shardline.executor import EngineDeadError, StepFuture, multiproc
from shardline.executor.multiproc import EXIT_STATUS_WAIT_S, _Workers
from shardline.models.partition import stage_layer_range
from multiproc_helpers import step
from stub_workers import NUM_KV_BLOCKS, run_worker_joining_late


def test_collective_rpc_answers_once_per_rank_in_rank_order(make_executor):
    executor = make_executor(tensor_parallel_size=2, pipeline_parallel_size=2)
    # The cache is sized to the tightest rank (rank 0 reports the fewest blocks).
    assert executor.num_kv_blocks == NUM_KV_BLOCKS
    ids = executor.collective_rpc("identity")
    assert [i[0] for i in ids] == [0, 1, 2, 3]
    assert [i[1] for i in ids] == executor.worker_pids
    assert all(i[2] == NUM_KV_BLOCKS for i in ids)
    assert executor.collective_rpc("echo", args=([1, "x"],), kwargs={"scale": 2}) == \
        [[1, "x", 1, "x"]] * 4


def test_execute_model_answers_from_the_first_tp_rank_of_the_last_stage(make_executor):
    executor = make_executor(tensor_parallel_size=2, pipeline_parallel_size=2)
    out = executor.execute_model(step("a", "b"))
    assert out.req_ids == ["a", "b"] and out.sampled_token_ids == [1002, 1002]


def test_steps_in_flight_come_back_in_order(make_executor):
    executor = make_executor(pipeline_parallel_size=2)
    futures = [executor.execute_model(step(f"r{i}"), non_block=True) for i in range(6)]
    assert all(isinstance(f, StepFuture) for f in futures)
    # Reading a later step first collects the earlier ones on the way.
    assert futures[3].result(timeout=10).req_ids == ["r3"]
    assert all(f.done() for f in futures[:4])
    assert [f.result().req_ids for f in futures] == [[f"r{i}"] for i in range(6)]
    # A collective call waits for the steps still in flight first.
    more = executor.execute_model(step("late"), non_block=True)
    assert [i[0] for i in executor.collective_rpc("identity")] == [0, 1]
    assert more.done() and more.result().req_ids == ["late"]


def test_a_failing_call_names_the_rank_and_the_executor_carries_on(make_executor, rng):
    """An input error (ValueError) comes back as itself in one line, as one rank in process
    would raise it; a defect as a RuntimeError carrying the worker's traceback. One random
    rank fails: where every rank fails, which one is named depends on whose reply is back
    when the executor looks (worker_proc.replies_in_order)."""
    executor = make_executor(tensor_parallel_size=2)
    failing = rng.randrange(2)
    with pytest.raises(ValueError) as raised:
        executor.collective_rpc("fail_on", args=(failing, "bad input", 0))
    assert str(raised.value) == f"fail_on failed on worker rank {failing}: bad input"
    with pytest.raises(RuntimeError, match=rf"(?s)^crash failed on worker rank {failing}: "
                                           r"ZeroDivisionError: division by zero\nTraceback "
                                           r".*in crash"):
        executor.collective_rpc("crash", args=(failing,))
    # A result the rings cannot carry is the caller's error; it killed the worker before.
    with pytest.raises(TypeError, match=rf"^unsendable failed on worker rank {failing}: .*set"):
        executor.collective_rpc("unsendable", args=(failing,))
    assert executor.collective_rpc("echo", args=(3,)) == [3, 3]


def test_a_later_ranks_error_is_raised_while_earlier_ranks_still_run(make_executor, rng):
    """Replies were read in rank order: a rank's error waited for every rank before it,
    for ever where those wait for it in a collective. It now comes within ANSWER_POLL_S
    (0.5 s), and the executor serves on once the other ranks' late replies are skipped."""
    executor = make_executor(tensor_parallel_size=2, pipeline_parallel_size=2)
    failing = rng.randrange(1, executor.num_workers)
    message = f"bad input {rng.randrange(10**6)}"
    start = time.monotonic()
    with pytest.raises(ValueError) as raised:
        executor.collective_rpc("fail_on", args=(failing, message, 4.0))
    elapsed = time.monotonic() - start
    print(f"rank {failing}'s error came {elapsed:.2f} s after the call")
    assert str(raised.value) == f"fail_on failed on worker rank {failing}: {message}"
    assert elapsed < 2.5
    value = rng.randrange(1000)
    assert executor.collective_rpc("echo", args=(value,), timeout=30) == [value] * 4


def test_collective_rpc_timeout_fires_and_late_replies_are_skipped(make_executor):
    executor = make_executor(tensor_parallel_size=2)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"collective_rpc\('sleep'\).*ranks \[0, 1\]"):
        executor.collective_rpc("sleep", args=(1.5,), timeout=0.3)
    assert time.monotonic() - start < 1.0
    assert executor.collective_rpc("echo", args=(7,), timeout=10) == [7, 7]


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "mid-call"])
def test_a_killed_worker_makes_every_call_raise_engine_dead(make_executor, busy):
    executor = make_executor(tensor_parallel_size=2, pipeline_parallel_size=2)
    victim = 1
    if busy:
        threading.Timer(0.3, os.kill, (executor.worker_pids[victim], signal.SIGKILL)).start()
    else:
        os.kill(executor.worker_pids[victim], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(EngineDeadError, match=rf"worker rank {victim} \(pid \d+\) died with "
                                              r"exit code -9"):
        executor.collective_rpc("sleep", args=(30 if busy else 0,))
    assert time.monotonic() - start < 5.0
    with pytest.raises(EngineDeadError, match=f"worker rank {victim}"):
        executor.execute_model(step("after"), non_block=True)


def test_steps_in_flight_when_a_worker_dies_all_raise_engine_dead(make_executor, rng):
    """PP2 with four 3-second steps sent at once: SIGKILL of a random rank while the
    first runs makes every one of them raise EngineDeadError naming it, within 5 s
    (target 2)."""
    executor = make_executor("SlowStepWorker", pipeline_parallel_size=2)
    victim = rng.randrange(2)
    futures = [executor.execute_model(step(f"r{i}"), non_block=True) for i in range(4)]
    time.sleep(rng.uniform(0.1, 0.5))
    os.kill(executor.worker_pids[victim], signal.SIGKILL)
    killed = time.monotonic()
    dead = rf"worker rank {victim} \(pid {executor.worker_pids[victim]}\) died with exit code -9"
    for future in futures:
        with pytest.raises(EngineDeadError, match=dead):
            future.result(timeout=10)
    elapsed = time.monotonic() - killed
    print(f"every step in flight raised EngineDeadError {elapsed:.3f} s after the SIGKILL")
    assert elapsed < 5.0


def test_a_worker_failing_in_execute_model_kills_the_engine_with_its_error(make_executor,
                                                                          caplog):
    executor = make_executor("CrashOnStepWorker", tensor_parallel_size=2)
    logged = "[rank 1] execute_model failed: forward failed on purpose"
    with caplog.at_level(logging.ERROR, logger="shardline"):
        deadline = time.monotonic() + 30
        with pytest.raises(EngineDeadError, match="worker rank 1 .* exit code 1"):
            while time.monotonic() < deadline:  # rank 0 answers until rank 1's death is seen
                executor.execute_model(step("a"))
        # The log relay thread may pass the record on just after the death is seen.
        while logged not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
    assert logged in caplog.text


@pytest.mark.parametrize("where", ["step", "constructor"])
def test_a_failed_ranks_error_is_in_the_engine_dead_error_once(make_executor, monkeypatch,
                                                               rng, where):
    """A rank that fails and stops (in a step, or building its worker) says why as it
    exits: the EngineDeadError names its exit code and its error, once, whichever rank it
    is. Before, a rank other than the output rank was only "died with exit code 1"."""
    failing = rng.randrange(4)
    message = f"failed on purpose {rng.randrange(10**6)}"
    monkeypatch.setenv("STUB_FAIL_IN", where)
    monkeypatch.setenv("STUB_FAIL_RANK", str(failing))
    monkeypatch.setenv("STUB_FAIL_MESSAGE", message)
    if where == "constructor":
        with pytest.raises(EngineDeadError) as raised:
            make_executor("FailingRankWorker", tensor_parallel_size=2, pipeline_parallel_size=2)
    else:
        executor = make_executor("FailingRankWorker", tensor_parallel_size=2,
                                 pipeline_parallel_size=2)
        deadline = time.monotonic() + 30
        with pytest.raises(EngineDeadError) as raised:
            while time.monotonic() < deadline:  # the output rank answers until the death is seen
                executor.execute_model(step("a"))
    said = (rf"worker rank {failing} \(pid \d+\) died with exit code 1 after it failed: "
            rf"RuntimeError: {message}\nTraceback ")
    assert len(re.findall(said, str(raised.value))) == 1, str(raised.value)
    assert str(raised.value).count(message) == 2  # in the line and the traceback's end


def test_a_worker_failing_while_the_others_start_fails_the_start_by_name(make_executor,
                                                                        monkeypatch, rng):
    """Rank 3 joins the broadcast ring 2 s late, and an earlier rank fails building its
    worker meanwhile: the executor's wait for every rank to join raised PeerDied; now
    EngineDeadError names the rank and its error."""
    failing = rng.randrange(3)
    message = f"failed on purpose {rng.randrange(10**6)}"
    monkeypatch.setenv("STUB_FAIL_IN", "constructor")
    monkeypatch.setenv("STUB_FAIL_RANK", str(failing))
    monkeypatch.setenv("STUB_FAIL_MESSAGE", message)
    monkeypatch.setattr(multiproc, "run_worker", run_worker_joining_late)
    with pytest.raises(EngineDeadError, match=rf"^the workers failed to start: worker rank "
                                              rf"{failing} \(pid \d+\) died with exit code 1 "
                                              rf"after it failed: RuntimeError: {message}\n"):
        make_executor("FailingRankWorker", tensor_parallel_size=2, pipeline_parallel_size=2)


def test_worker_logs_reach_the_parent_with_the_rank_in_front(make_executor, caplog):
    executor = make_executor(tensor_parallel_size=2)
    with caplog.at_level(logging.WARNING, logger="shardline"):
        executor.collective_rpc("log", args=("hello from a worker",))
        deadline = time.monotonic() + 5
        while caplog.text.count("hello from a worker") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert "[rank 0] hello from a worker" in caplog.text
    assert "[rank 1] hello from a worker" in caplog.text


def test_idle_workers_use_no_cpu(make_executor):
    executor = make_executor(tensor_parallel_size=2)
    executor.collective_rpc("identity")
    time.sleep(0.3)
    procs = [psutil.Process(pid) for pid in executor.worker_pids]
    before = [sum(p.cpu_times()[:2]) for p in procs]
    time.sleep(1.0)
    used = [sum(p.cpu_times()[:2]) - b for p, b in zip(procs, before)]
    assert max(used) < 0.05, f"idle workers used {used} s of CPU in 1 s"


@pytest.mark.parametrize("tp", [1, 2])
def test_worker_processes_leave_a_core_to_the_engine(make_executor, tp):
    """The ranks' torch threads and the engine's process never outnumber the cores: else
    each barrier of torch's thread pool can wait a scheduler slice for a preempted thread
    (tiny-llama steps of 4 ms took 200 ms on a busy 2-core machine)."""
    executor = make_executor("threads_worker.TorchThreadsWorker", tensor_parallel_size=tp)
    cores = len(os.sched_getaffinity(0))
    threads = executor.collective_rpc("torch_threads", timeout=60)
    assert threads == [max(1, (cores - 1) // tp)] * tp


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2), (4, 1)])
def test_each_rank_caches_only_its_own_kv_heads_for_its_stages_layers(make_executor, tp, pp):
    """tiny-llama (2 layers, 2 KV heads of 32): a rank's cache has one tensor pair per
    layer of its stage, each holding 2 // TP KV heads (one when TP4 replicates them)."""
    executor = make_executor("threads_worker.CacheShapesWorker", tensor_parallel_size=tp,
                             pipeline_parallel_size=pp)
    block = executor.config.cache.block_size
    for rank, shapes in enumerate(executor.collective_rpc("kv_cache_shapes", timeout=60)):
        layers = stage_layer_range(2, pp, rank // tp)
        shape = [executor.num_kv_blocks, block, max(1, 2 // tp), 32]
        assert shapes == {i: [shape, shape] for i in layers}, rank


def test_a_dead_workers_exit_code_is_read_without_waiting():
    """The watcher names a dead worker's exit code at once when the kernel has it, and
    waits (briefly) only in the moment between the sentinel and the exit status."""
    class Reaped:
        pid, exitcode = 4242, -9

        def join(self, timeout=None):
            raise AssertionError("joined a worker whose exit code was known")

    class Dying:
        pid, exitcode, waited = 4343, None, None

        def join(self, timeout=None):
            self.waited, self.exitcode = timeout, -9

    workers = _Workers(first_rank=2)
    try:
        workers.procs = [Reaped(), Dying()]
        assert workers.describe_ended([0, 1]) == (
            "worker rank 2 (pid 4242) died with exit code -9; "
            "worker rank 3 (pid 4343) died with exit code -9")
        assert workers.procs[1].waited == EXIT_STATUS_WAIT_S <= 0.2
    finally:
        workers.log_queue.close()
