"""The multi-process executor's plumbing, with model-free stub workers in spawned processes:
replies per rank, the output rank, steps in flight, errors, timeouts, dead workers, the
ranks' rendezvous (one executor's, or data-parallel cores' shared one) and a clean
shutdown (no process, nothing in /dev/shm and no rendezvous file left behind)."""

from __future__ import annotations

import gc
import logging
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

from shardline.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from shardline.executor import EngineDeadError, StepFuture
from shardline.executor.data_parallel import _on_every_core, create_data_parallel_executors
from shardline.executor.multiproc import EXIT_STATUS_WAIT_S, MultiProcExecutor, _Workers
from shardline.models.partition import stage_layer_range
from shardline.presets import resolve_model
from shardline.step import CachedRequestData, CachedRequests, SchedulerOutput
from process_hygiene import assert_gone, leaked_segments, shm_segments
from stub_workers import NUM_KV_BLOCKS


def make_config(worker: str = "StubWorker", **parallel) -> EngineConfig:
    return EngineConfig(ModelConfig(resolve_model("tiny-llama")), CacheConfig(),
                        SchedulerConfig(),
                        ParallelConfig(distributed_executor_backend="mp", device="cpu",
                                       worker_cls=worker if "." in worker
                                       else f"stub_workers.{worker}", **parallel))


WORLDS = {"tp2": dict(tensor_parallel_size=2), "dp2": dict(data_parallel_size=2)}


def start_world(config: EngineConfig) -> list[MultiProcExecutor]:
    """The started executors of `config`'s world of ranks: one per data-parallel core."""
    if config.parallel.data_parallel_size > 1:
        return create_data_parallel_executors(config)
    return [MultiProcExecutor(config)]


def step(*req_ids: str) -> SchedulerOutput:
    """A decode step of `req_ids`, one token each."""
    return SchedulerOutput(
        cached_requests=CachedRequests.of(CachedRequestData(r, [1], [], 0) for r in req_ids),
        num_scheduled_tokens={r: 1 for r in req_ids})


@pytest.fixture
def make_executor():
    made: list[MultiProcExecutor] = []

    def make(worker: str = "StubWorker", **parallel) -> MultiProcExecutor:
        executor = MultiProcExecutor(make_config(worker, **parallel))
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.shutdown()
        assert_gone(executor.worker_pids)


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


def test_a_failing_call_names_the_rank_and_the_executor_carries_on(make_executor):
    """An input error (ValueError) comes back as itself in one line, as one rank in process
    would raise it; a defect as a RuntimeError carrying the worker's traceback."""
    executor = make_executor(tensor_parallel_size=2)
    with pytest.raises(ValueError) as raised:
        executor.collective_rpc("fail", args=("bad input",))
    assert str(raised.value) == "fail failed on worker rank 0: bad input"
    with pytest.raises(RuntimeError, match=r"(?s)^crash failed on worker rank 0: ZeroDivisionError"
                                           r": division by zero\nTraceback .*in crash"):
        executor.collective_rpc("crash")
    # A result the rings cannot carry is the caller's error; it killed the worker before.
    with pytest.raises(TypeError, match=r"^unsendable failed on worker rank 0: .*set"):
        executor.collective_rpc("unsendable")
    assert executor.collective_rpc("echo", args=(3,)) == [3, 3]


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
from test_multiproc import WORLDS, make_config, start_world
executors = start_world(make_config(**WORLDS[{world!r}]))
print(" ".join(str(pid) for executor in executors for pid in executor.worker_pids), flush=True)
print(executors[0]._group.rendezvous.directory, flush=True)
if {interrupt}:
    executors[0].collective_rpc("sleep", args=(60,))
"""


@pytest.mark.parametrize("world", list(WORLDS))
@pytest.mark.parametrize("interrupt", [False, True], ids=["interpreter-exit", "ctrl-c"])
def test_interpreter_exit_and_ctrl_c_leave_no_worker_and_no_rendezvous(interrupt, world):
    before = shm_segments()
    here = os.path.dirname(__file__)
    script = _EXIT_SCRIPT.format(stub_dir=here, tests_dir=os.path.dirname(here),
                                 world=world, interrupt=interrupt)
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2, proc.stderr.read()
        rendezvous_dir = proc.stdout.readline().strip()
        assert os.path.isdir(rendezvous_dir)
        if interrupt:
            time.sleep(0.5)
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
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
