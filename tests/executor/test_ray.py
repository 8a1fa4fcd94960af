"""The Ray executor on a two-node Ray cluster on this machine (ray.cluster_utils.Cluster;
each node its own Ray node, with its own node agent and shared-memory broadcast ring):

- plumbing with model-free stub workers at TP2 x PP2, one stage per node: one reply per
  rank in rank order, the output rank, steps in flight, a failing call, a timeout, and a
  node agent killed under a call; a TP group larger than any node is refused, not split;
- the engine at TP2 x PP2 (tiny-llama) and DP2 (tiny-qwen2), one stage or one replica
  per node, gives the greedy tokens of the one-rank in-process engine (fp32, CPU);
- a rank actor killed while serving fails the engine (under DP2, every core) with
  EngineDeadError within 10 s, and shutdown leaves no actor process and no
  shared-memory segment behind.

The cluster starts once per module and every node has 2 (fake) CPUs, one per rank, so a
block of TP ranks fills a node and the placement group must use both.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'shardline[ray]'")

from ray.cluster_utils import Cluster  # noqa: E402

from near_ties import Run, assert_greedy_match, outputs_run  # noqa: E402
from shardline import LLM, SamplingParams  # noqa: E402
from shardline.executor import EngineDeadError, StepFuture  # noqa: E402
from shardline.executor.base import executor_class  # noqa: E402
from shardline.config import ParallelConfig  # noqa: E402
from shardline.executor import ray_placement, stopped_workers, worker_group  # noqa: E402
from shardline.executor.ray import RayExecutor  # noqa: E402
from shardline.executor.ray_placement import ranks_sharing_node  # noqa: E402
from shardline.worker.worker import RANKS_ON_NODE_ENV, cpu_threads  # noqa: E402
from process_hygiene import leaked_segments, shm_segments  # noqa: E402
from stub_workers import NUM_KV_BLOCKS, TIME_FILE_ENV  # noqa: E402
from multiproc_helpers import (AGENT_SIGNAL_S, make_config,  # noqa: E402
                               slow_step_reports, slow_step_reports_of_core_0, step, step_times)

HERE = os.path.dirname(os.path.abspath(__file__))
ENGINE = dict(block_size=4, num_kv_blocks=24, max_num_batched_tokens=16, max_num_seqs=8,
              device="cpu")
NODE_CPUS = 2


@pytest.fixture(scope="module")
def cluster():
    """A head node that runs nothing and two worker nodes, each labelled by a custom
    resource so that tests can tell which node a rank landed on."""
    before = shm_segments()
    cluster = Cluster(initialize_head=True,
                      head_node_args=dict(num_cpus=0, include_dashboard=False))
    nodes = {cluster.add_node(num_cpus=NODE_CPUS, resources={f"test-node-{i}": 1}).node_id: i
             for i in range(2)}
    # The stub workers' module must be importable in the actors, as in the spawned workers.
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                 [HERE, os.path.dirname(HERE)])}})
    try:
        yield nodes
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert not leaked_segments(before)


@pytest.fixture(autouse=True)
def _cluster_idle(request):
    """Before a test on the cluster, wait until the previous test's actors and placement
    group have given their CPUs back (Ray frees them asynchronously): SPREAD is best
    effort, and with one node still busy it packs every bundle on the other."""
    if "cluster" not in request.fixturenames:
        return
    request.getfixturevalue("cluster")
    total = 2 * NODE_CPUS
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < total:
        assert time.monotonic() < deadline, (
            f"the cluster still holds CPUs 30 s after the last test: {ray.available_resources()}")
        time.sleep(0.05)


def wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while any(psutil.pid_exists(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = [pid for pid in pids if psutil.pid_exists(pid)]
    assert not alive, f"actor processes {alive} are still running"


def random_prompts(seed: int, n: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 259) for _ in range(rng.randint(3, 30))] for _ in range(n)]


def greedy_tokens(llm: LLM, prompts: list[list[int]]) -> Run:
    """Greedy tokens with their top-2 logprobs, for tests/near_ties.py."""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
    return outputs_run(llm.generate(prompts, params))


def test_the_ray_backend_gets_the_ray_executor():
    assert executor_class(ParallelConfig(distributed_executor_backend="ray")) is RayExecutor
    with pytest.raises(ValueError, match=r"ray_address=''.*a Ray cluster address"):
        ParallelConfig(distributed_executor_backend="ray", ray_address="")
    with pytest.raises(ValueError, match=r"ray_address='auto'.*unless distributed_executor_"
                                         r"backend='ray' \(it is 'mp'\)"):
        ParallelConfig(distributed_executor_backend="mp", ray_address="auto")


@pytest.mark.parametrize("nodes, threads", [
    (["a", "a", "b", "b"], [7, 7, 3, 3]),
    (["a", "b", "a", "b"], [7, 3, 7, 3]),
    (["a", "a", "a", "b"], [5, 5, 5, 7]),
], ids=["stage-per-node", "interleaved", "uneven"])
def test_ranks_split_the_cores_of_their_own_node(monkeypatch, nodes, threads):
    """4 ranks on 2 nodes (a: 16 cores, b: 8): each rank's torch threads are its node's
    cores, less one, shared among that node's ranks, not among the 4 of the world."""
    parallel = ParallelConfig(distributed_executor_backend="ray", device="cpu",
                              tensor_parallel_size=4)
    node_cores = {"a": 16, "b": 8}
    got = []
    for node, sharing in zip(nodes, ranks_sharing_node(nodes)):
        monkeypatch.setenv(RANKS_ON_NODE_ENV, str(sharing))
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(node_cores[node])))
        got.append(cpu_threads(parallel))
    assert got == threads


def test_plumbing_over_two_nodes_with_stub_workers(cluster, rng):
    config = make_config(tensor_parallel_size=2, pipeline_parallel_size=2)
    config.parallel.distributed_executor_backend = "ray"
    executor = RayExecutor(config)
    try:
        # One pipeline stage (a TP block) per node, each node fed by its own agent.
        assert executor.rank_nodes[0] == executor.rank_nodes[1]
        assert executor.rank_nodes[2] == executor.rank_nodes[3]
        assert {cluster[node] for node in executor.rank_nodes} == {0, 1}
        assert executor.node_ranks == [[0, 1], [2, 3]]
        assert executor.collective_rpc("environ", args=(RANKS_ON_NODE_ENV,)) == ["2"] * 4
        assert executor.num_kv_blocks == NUM_KV_BLOCKS
        ids = executor.collective_rpc("identity")
        assert [i[0] for i in ids] == [0, 1, 2, 3]
        assert [i[1] for i in ids] == executor.worker_pids[:4]
        assert executor.collective_rpc("echo", args=([1, "x"],), kwargs={"scale": 2}) == \
            [[1, "x", 1, "x"]] * 4
        # Answered by the first TP rank of the last stage; several steps in flight.
        futures = [executor.execute_model(step(f"r{i}"), non_block=True) for i in range(5)]
        assert all(isinstance(f, StepFuture) for f in futures)
        assert futures[2].result(timeout=10).sampled_token_ids == [1002]
        assert [f.result(timeout=10).req_ids for f in futures] == [[f"r{i}"] for i in range(5)]
        # One random rank fails: where every rank fails, the executor names the first
        # failing rank among the node agents' replies back by then, which depends on timing.
        failing = rng.randrange(4)
        with pytest.raises(ValueError, match=rf"^fail_on failed on worker rank {failing}: no$"):
            executor.collective_rpc("fail_on", args=(failing, "no", 0))
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"collective_rpc\('sleep'\).*ranks \[0, 1, 2, 3\]"):
            executor.collective_rpc("sleep", args=(1.5,), timeout=0.3)
        assert time.monotonic() - start < 1.0
        assert executor.collective_rpc("echo", args=(7,), timeout=10) == [7] * 4

        # The second node's agent dies while its ranks are busy with a call.
        threading.Timer(0.3, os.kill, (executor.worker_pids[5], signal.SIGKILL)).start()
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match=r"node agent of ranks \[2, 3\] \(pid \d+\) "
                                                  r"died"):
            executor.collective_rpc("sleep", args=(30,))
        assert time.monotonic() - start < 5.0
        with pytest.raises(EngineDeadError, match=r"node agent of ranks \[2, 3\]"):
            executor.execute_model(step("after"), non_block=True)
    finally:
        pids = executor.worker_pids
        executor.shutdown()
        executor.shutdown()
    wait_gone(pids)


def test_a_rank_left_stopped_fails_the_engine_naming_it(cluster, monkeypatch, rng):
    """SIGSTOP of a rank actor: its node's agent sees it stay stopped and the engine fails
    with EngineDeadError naming it (before, every call waited for ever)."""
    monkeypatch.setattr(stopped_workers, "STOPPED_LIMIT_S", 1.0)
    config = make_config(tensor_parallel_size=2, pipeline_parallel_size=2)
    config.parallel.distributed_executor_backend = "ray"
    executor = RayExecutor(config)
    pids = executor.worker_pids
    try:
        victim = rng.randrange(4)
        os.kill(pids[victim], signal.SIGSTOP)
        stopped = time.monotonic()
        with pytest.raises(EngineDeadError, match=rf"worker rank {victim} \(pid {pids[victim]}\) "
                                                  r"has been stopped \(SIGSTOP"):
            executor.collective_rpc("echo", args=(1,), timeout=60)
        elapsed = time.monotonic() - stopped
        print(f"EngineDeadError {elapsed:.2f} s after SIGSTOP of rank {victim}")
        assert elapsed < 10.0
    finally:
        executor.shutdown()
    wait_gone(pids)


def test_a_slow_step_is_reported_with_every_ranks_stacks_in_its_log(cluster, monkeypatch,
                                                                    caplog, rng, step_times_dir):
    """As under the multi-process executor (test_slow_steps.py): a 3 s step is reported
    while it runs, and each rank actor writes its stacks, inside the step, to its log."""
    monkeypatch.setattr(worker_group, "SLOW_STEP_S", rng.uniform(0.5, 1.0))
    config = make_config("SlowStepWorker", tensor_parallel_size=2, pipeline_parallel_size=2)
    config.parallel.distributed_executor_backend = "ray"
    executor = RayExecutor(config)
    pids = executor.worker_pids[:4]
    try:
        sent = time.time()
        with caplog.at_level(logging.WARNING, logger="shardline"):
            assert executor.execute_model(step("a")).sampled_token_ids == [1002]
        reports, inside = slow_step_reports(caplog.records, sent, step_times(step_times_dir, 4),
                                            AGENT_SIGNAL_S)
        assert inside and all("worker rank 2 (the output rank)" in m and "Ray worker logs" in m
                              for m in reports), reports
        logs = ray._private.worker._global_node.get_logs_dir_path()
        for pid in pids:
            err = "".join(open(path).read() for path in glob.glob(f"{logs}/*-{pid}.err"))
            assert err.count("in execute_model") >= inside, (pid, err[-1000:])
    finally:
        executor.shutdown()
    wait_gone(pids)


def test_a_step_past_its_timeout_stops_every_rank_actor(cluster, rng):
    """step_timeout_s under Ray: a rank spinning in its step fails the engine, and the
    actors (spinning ones too) end without a shutdown call, after showing their stacks."""
    config = make_config("SpinningWorker", tensor_parallel_size=2, pipeline_parallel_size=2)
    config.parallel.distributed_executor_backend = "ray"
    config.parallel.step_timeout_s = timeout = rng.uniform(0.5, 1.5)
    executor = RayExecutor(config)
    pids = executor.worker_pids[:4]
    try:
        assert executor.execute_model(step("a")).sampled_token_ids == [1002]
        started = time.monotonic()
        with pytest.raises(EngineDeadError, match="worker rank 2 \\(the output rank\\) did "
                                                  "not answer a step within step_timeout_s="):
            executor.execute_model(step("spin"))
        assert timeout <= time.monotonic() - started < timeout + 30
        wait_gone(pids)
        # Every rank wrote its stacks before it was killed.
        logs = ray._private.worker._global_node.get_logs_dir_path()
        for pid in pids:
            err = "".join(open(path).read() for path in glob.glob(f"{logs}/*-{pid}.err"))
            assert "in execute_model" in err, (pid, err[-1000:])
    finally:
        executor.shutdown()


def test_a_slow_step_shows_the_stacks_of_every_data_parallel_core(cluster, monkeypatch,
                                                                   caplog, rng, step_times_dir):
    """Core 0's step may wait on core 1's rank (expert parallelism's all-to-all spans the
    cores), and the engine reads core 0's step first: core 1's rank wrote no stacks."""
    from shardline.executor.data_parallel import create_data_parallel_executors

    monkeypatch.setattr(worker_group, "SLOW_STEP_S", rng.uniform(0.5, 1.0))
    config = make_config("SlowStepWorker", data_parallel_size=2)
    config.parallel.distributed_executor_backend = "ray"
    cores = create_data_parallel_executors(config)
    pids = [core.worker_pids[0] for core in cores]
    try:
        _, inside = slow_step_reports_of_core_0(cores, caplog, step_times_dir, AGENT_SIGNAL_S)
        assert inside
        logs = ray._private.worker._global_node.get_logs_dir_path()
        for pid in pids:
            err = "".join(open(path).read() for path in glob.glob(f"{logs}/*-{pid}.err"))
            assert err.count("in execute_model") >= inside, (pid, err[-1000:])
    finally:
        for core in cores:
            core.shutdown()
    wait_gone(pids)


def test_a_ranks_setup_error_is_raised_while_the_others_wait_for_it(cluster, monkeypatch,
                                                                    tmp_path):
    """Rank 1's init_device raises while ranks 0, 2 and 3 wait there 60 s (as in a
    rendezvous): the start fails with rank 1's error at once, where the agents read the
    replies in rank order and the executor waited for every agent, past those 60 s. The
    time runs from rank 1's failure: starting the actors before it took 46 s on a loaded
    2-core machine."""
    noted = tmp_path / "time"
    monkeypatch.setenv(TIME_FILE_ENV, str(noted))
    config = make_config("FailsInInitWorker", tensor_parallel_size=2, pipeline_parallel_size=2)
    config.parallel.distributed_executor_backend = "ray"
    with pytest.raises(RuntimeError, match=r"^init_device failed on worker rank 1: RuntimeError: "
                                           r"init_device failed on purpose"):
        RayExecutor(config)
    elapsed = time.monotonic() - float(noted.read_text())
    print(f"the start failed {elapsed:.1f} s after rank 1 failed")
    assert elapsed < 40.0


def test_a_tp_group_larger_than_any_node_is_refused_not_split(cluster, monkeypatch):
    monkeypatch.setattr(ray_placement, "PLACEMENT_TIMEOUT_S", 3.0)
    config = make_config(tensor_parallel_size=2 * NODE_CPUS)
    config.parallel.distributed_executor_backend = "ray"
    with pytest.raises(RuntimeError, match=r"could not reserve 1 bundles of \{'CPU': 4.0\} "
                                           r"\(one per TP x SP block of 4 ranks\) within 3 s"):
        RayExecutor(config)
    assert not [pg for pg in ray.util.placement_group_table().values()
                if pg["state"] not in ("REMOVED",)]


_EXIT_SCRIPT = """
import os, sys
sys.path[:0] = [{here!r}, {tests!r}]
import ray
ray.init(address={address!r}, log_to_driver=False,
         runtime_env={{"env_vars": {{"PYTHONPATH": os.pathsep.join(sys.path[:2])}}}})
from multiproc_helpers import make_config
from shardline.executor.ray import RayExecutor
config = make_config(tensor_parallel_size=2)
config.parallel.distributed_executor_backend = "ray"
executor = RayExecutor(config)
print(" ".join(map(str, executor.worker_pids)), flush=True)
"""


def test_a_driver_that_exits_without_shutdown_leaves_no_actor(cluster):
    script = _EXIT_SCRIPT.format(here=HERE, tests=os.path.dirname(HERE),
                                 address=ray.get_runtime_context().gcs_address)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    pids = [int(pid) for pid in proc.stdout.split()]
    assert proc.returncode == 0 and len(pids) == 3, proc.stderr[-2000:]
    wait_gone(pids)


@pytest.fixture(scope="module")
def reference_tokens():
    """The one-rank in-process engine's greedy tokens, per model and seed."""
    made: dict[tuple[str, int], Run] = {}

    def tokens(model: str, seed: int) -> Run:
        if (model, seed) not in made:
            with LLM(model, **ENGINE) as llm:
                made[model, seed] = greedy_tokens(llm, random_prompts(seed, 6))
        return made[model, seed]

    return tokens


def test_tp2_pp2_one_stage_per_node_matches_one_rank_and_dies_cleanly(cluster,
                                                                       reference_tokens,
                                                                       fresh_seed):
    llm = LLM("tiny-llama", distributed_executor_backend="ray", tensor_parallel_size=2,
              pipeline_parallel_size=2, **ENGINE)
    executor = llm.engine.executor
    pids = executor.worker_pids
    try:
        assert isinstance(executor, RayExecutor)
        assert [cluster[node] for node in executor.rank_nodes] in ([0, 0, 1, 1], [1, 1, 0, 0])
        prompts = random_prompts(fresh_seed, 6)
        assert_greedy_match(reference_tokens("tiny-llama", fresh_seed), greedy_tokens(llm, prompts))

        # A rank of the second stage dies while the engine serves.
        params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
        for i, prompt in enumerate(prompts):
            llm.engine.add_request(f"long-{i}", prompt, params)
        llm.engine.step()
        os.kill(pids[3], signal.SIGKILL)
        start = time.monotonic()
        # Rank 3's TP peer fails its all-reduce and exits too; where Ray reports that exit
        # over 0.2 s before the kill (the watcher's window, seen under load), the error
        # names rank 2 and, as the peer whose death it saw, rank 3's pid.
        died = (rf"worker rank 3 \(pid {pids[3]}\) died|PeerDied: \w+: rank 1 "
                rf"\(pid {pids[3]}\) of shared-memory collective group '[^']+' died")
        with pytest.raises(EngineDeadError, match=died):
            while time.monotonic() - start < 30:
                llm.engine.step()
        assert time.monotonic() - start < 10.0
    finally:
        llm.shutdown()
    wait_gone(pids)


def test_dp2_one_replica_per_node_matches_one_rank_and_fails_together(cluster,
                                                                      reference_tokens,
                                                                      fresh_seed):
    with LLM("tiny-qwen2", distributed_executor_backend="ray", data_parallel_size=2,
             **ENGINE) as llm:
        cores = llm.engine.cores
        pids = [pid for core in cores for pid in core.executor.worker_pids]
        assert {cluster[core.executor.rank_nodes[0]] for core in cores} == {0, 1}
        assert [core.executor.node_ranks for core in cores] == [[[0]], [[1]]]
        prompts = random_prompts(fresh_seed, 6)
        assert_greedy_match(reference_tokens("tiny-qwen2", fresh_seed), greedy_tokens(llm, prompts))
        assert all(core.stats.num_steps > 0 for core in cores)

        # The second replica's rank dies: the first core stops with it.
        os.kill(cores[1].executor.worker_pids[0], signal.SIGKILL)
        start = time.monotonic()
        for core in cores:
            with pytest.raises(EngineDeadError, match=r"worker rank 1 \(pid \d+\) died"):
                while time.monotonic() - start < 30:
                    core.executor.collective_rpc("determine_num_kv_blocks", timeout=10)
        assert time.monotonic() - start < 10.0
    wait_gone(pids)
