"""Workers on the nodes of a Ray cluster: one actor per rank, one agent per node.

`distributed_executor_backend="ray"` joins the cluster at `ParallelConfig.ray_address`
(or RAY_ADDRESS), or starts a local one, and reserves a placement group that keeps every
TP and SP group inside one node (see ray_placement). Calls reach each node once over Ray,
through that node's agent, and the node's ranks read them from a shared-memory broadcast
ring, as under the multi-process executor (see ray_worker); replies come back over Ray.
The contract is MultiProcExecutor's: one reply per rank from `collective_rpc`, with a
timeout that names the ranks that did not answer; `execute_model` answered by the output
rank, blocking or as a StepFuture; and EngineDeadError for every pending and later call
once an actor, or a whole node, dies. A watcher thread waits on every actor's
long-running call (a rank's serving loop, an agent's `run_until_closed`), which Ray ends
with an error when the actor's process or node dies.

The ranks talk NCCL (CUDA) or gloo (CPU) over torch.distributed, rendezvousing at rank
0's node; docs/ray.md lists the network settings that matter across nodes.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from collections import deque
from typing import Any, Callable

try:
    import ray
    from ray.exceptions import GetTimeoutError, RayError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("distributed_executor_backend='ray' needs Ray: install it with "
                      "pip install 'shardline[ray]'") from exc

from shardline.config import EngineConfig
from shardline.executor.base import EngineDeadError, Executor, StepFuture, check_layout
from shardline.executor.ray_placement import RayWorld, connect, disconnect, forwarded_env
from shardline.executor.ray_worker import AGENT_CONCURRENCY, NodeAgent, RankActor
from shardline.executor.worker_proc import ALL_RANKS, SHUTDOWN
from shardline.step import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger("shardline")

STARTUP_TIMEOUT_S = 180.0
SHUTDOWN_GRACE_S = 5.0
_POLL_S = 0.05
_RankActor = ray.remote(RankActor)
_NodeAgent = ray.remote(NodeAgent)


def _ray_device(parallel_device: str | None) -> str:
    """"cpu" or "cuda": asked for, else SHARDLINE_DEVICE's type, else CUDA if the
    cluster has GPUs."""
    requested = parallel_device or os.environ.get("SHARDLINE_DEVICE")
    if requested:
        return requested.split(":")[0]
    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


class _Actors:
    """The actors, placement and helper thread of one executor: everything `shutdown`
    releases. Kept apart from the executor so the finalizer holds no reference to it."""

    def __init__(self, first_rank: int) -> None:
        self.first_rank = first_rank
        self.world: RayWorld | None = None
        self.ranks: list[Any] = []  # RankActor handles, in slice order
        self.agents: list[Any] = []  # NodeAgent handles, one per node
        self.watched: dict[Any, str] = {}  # long-running call -> what it is
        self.serving: list[Any] = []  # the ranks' serving loops (also in `watched`)
        self.pids: list[int] = []
        self.call_ids = itertools.count(1)
        self.dead: EngineDeadError | None = None
        self.lock = threading.Lock()
        self.on_death: list[Callable[[EngineDeadError], None]] = []
        self.stopping = False
        self.stopped = False
        self.connected = False

    def set_dead(self, error: EngineDeadError) -> bool:
        """Record why the executor stopped, so that every waiting and later call raises
        `error`; False if it had stopped already."""
        with self.lock:
            if self.dead is not None or self.stopped:
                return False
            self.dead = error
        return True

    def describe_end(self, ref: Any) -> str:
        try:
            code = ray.get(ref, timeout=1.0)
            return f"{self.watched[ref]} stopped with exit code {code}"
        except GetTimeoutError:
            return f"{self.watched[ref]} stopped"
        except RayError as exc:
            reason = str(exc).strip().splitlines()[0]
            return f"{self.watched[ref]} died ({type(exc).__name__}: {reason})"

    def watch(self) -> None:
        """The watcher thread: when any actor's long-running call ends, the executor is
        dead; every pending and later call raises, and `on_death` is told."""
        refs = list(self.watched)
        while not self.stopping and self.dead is None:
            try:
                ended, _ = ray.wait(refs, num_returns=1, timeout=0.5)
            except Exception:  # Ray shut down under us (interpreter exit)
                return
            if ended and not self.stopping and self.dead is None:
                ended, _ = ray.wait(refs, num_returns=len(refs), timeout=0.2)
                error = EngineDeadError("; ".join(self.describe_end(ref) for ref in ended))
                if self.set_dead(error):
                    logger.error("%s", error)
                    for callback in self.on_death:
                        callback(error)
                return

    def send(self, method: str, args: list, kwargs: dict, reply_rank: int,
             reply_indices: list[list[int]]) -> list[Any]:
        """Hand one call to every node's agent; their replies' object refs."""
        call_id = next(self.call_ids)
        message = [call_id, method, args, kwargs, reply_rank]
        return [agent.call.remote(call_id, message, indices)
                for agent, indices in zip(self.agents, reply_indices)]

    def shutdown(self) -> None:
        """Ask the ranks to stop, kill the actors, give back the placement group (and
        Ray, if this process started it). Idempotent."""
        if self.stopped:
            return
        self.stopping = True
        try:
            if self.agents and self.dead is None and self.watched:
                self.send(SHUTDOWN, [], {}, ALL_RANKS, [[] for _ in self.agents])
                ray.wait(self.serving, num_returns=len(self.serving),
                         timeout=SHUTDOWN_GRACE_S)
            for actor in self.ranks + self.agents:
                ray.kill(actor, no_restart=True)
            if self.watched:
                ray.wait(list(self.watched), num_returns=len(self.watched),
                         timeout=SHUTDOWN_GRACE_S)
        except Exception as exc:  # Ray already shut down (interpreter exit)
            logger.debug("stopping the Ray actors failed: %s", exc)
        with self.lock:
            self.stopped = True
        if self.world is not None:
            self.world.release()
        if self.connected:
            disconnect()


class RayExecutor(Executor):
    """Runs one actor per rank on a Ray cluster and drives them through node agents."""

    def _check_layout(self) -> None:
        parallel = self.config.parallel
        connect(parallel.ray_address, parallel.world_size)
        try:
            self.device_type = _ray_device(parallel.device)
            gpus = None
            if self.device_type == "cuda":
                gpus = int(ray.cluster_resources().get("GPU", 0))
                if gpus == 0:
                    raise ValueError(f"device={parallel.device!r} asks for GPUs, but the Ray "
                                     f"cluster has none ({ray.cluster_resources()}): use "
                                     "device='cpu'")
            checked = EngineConfig.from_dict(self.config.to_dict())
            checked.parallel.device = self.device_type
            check_layout(checked, gpus)
        except BaseException:
            disconnect()
            raise

    def _start_workers(self) -> None:
        parallel = self.config.parallel
        self.num_workers = self.ranks_per_core
        self.output_rank = parallel.output_rank  # within the slice
        self._pending: deque[tuple[StepFuture, list[Any]]] = deque()
        self._actors = actors = _Actors(self.first_rank)
        actors.connected = True
        self._finalizer = weakref.finalize(self, actors.shutdown)
        actors.world = world = RayWorld.acquire(parallel, self.device_type,
                                                self.distributed_init_method)
        config = self.config.to_dict()
        config["parallel"]["device"] = self.device_type
        env = forwarded_env()
        options = dict(num_cpus=1, num_gpus=1 if self.device_type == "cuda" else 0)
        if env:
            options["runtime_env"] = {"env_vars": env}
        ranks = range(self.first_rank, self.first_rank + self.num_workers)
        actors.ranks = [_RankActor.options(scheduling_strategy=world.strategy(rank), **options)
                        .remote(rank, logger.getEffectiveLevel()) for rank in ranks]
        # One agent per node, in the order of each node's first rank, started meanwhile.
        self.rank_nodes = [world.node_of(rank) for rank in ranks]
        nodes = list(dict.fromkeys(self.rank_nodes))
        self._node_indices = [[i for i, n in enumerate(self.rank_nodes) if n == node]
                              for node in nodes]
        actors.agents = [_NodeAgent.options(
            num_cpus=0, max_concurrency=AGENT_CONCURRENCY,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
            for node in nodes]
        infos = self._get([actor.describe.remote() for actor in actors.ranks], "start")
        actors.pids = [info["pid"] for info in infos]
        wired = self._get([agent.connect.remote([infos[i]["response"] for i in indices])
                           for agent, indices in zip(actors.agents, self._node_indices)],
                          "connect")
        actors.pids += [agent_pid for _, agent_pid in wired]
        for (broadcast, agent_pid), indices in zip(wired, self._node_indices):
            for reader_index, i in enumerate(indices):
                ref = actors.ranks[i].run.remote(
                    config, self.first_rank + i, i, reader_index, world.address,
                    parallel.worker_cls, broadcast, agent_pid)
                actors.watched[ref] = f"worker rank {self.first_rank + i} (pid {infos[i]['pid']})"
                actors.serving.append(ref)
        self._get([agent.wait_attached.remote(STARTUP_TIMEOUT_S,
                                              [infos[i]["pid"] for i in indices])
                   for agent, indices in zip(actors.agents, self._node_indices)], "attach")
        for agent, indices, (_, agent_pid) in zip(actors.agents, self._node_indices, wired):
            actors.watched[agent.run_until_closed.remote()] = (
                f"node agent of ranks {[self.first_rank + i for i in indices]} (pid {agent_pid})")
        # The thread holds only `actors`, so garbage collection can still reach the executor.
        threading.Thread(target=actors.watch, name="shardline-ray-watch", daemon=True).start()

    def _get(self, refs: list[Any], phase: str) -> list[Any]:
        """Results of startup calls; EngineDeadError if one fails, a rank's serving loop
        ends, or they take longer than STARTUP_TIMEOUT_S."""
        ranks = list(self._actors.watched)
        ready, pending = ray.wait(refs + ranks, num_returns=len(refs), timeout=STARTUP_TIMEOUT_S)
        ended = [ref for ref in ranks if ref in ready]
        if ended:
            raise EngineDeadError(f"while starting ({phase}): "
                                  + "; ".join(self._actors.describe_end(ref) for ref in ended))
        if any(ref in pending for ref in refs):
            raise EngineDeadError(f"the Ray actors did not {phase} within "
                                  f"{STARTUP_TIMEOUT_S:.0f} s")
        try:
            return ray.get(refs)
        except RayError as exc:
            raise EngineDeadError(f"a Ray actor failed to {phase}: {exc}") from None

    def _check_alive(self) -> None:
        if self._actors.dead is not None:
            raise self._actors.dead
        if self._actors.stopped:
            raise EngineDeadError("the executor has been shut down")

    def _dead_error(self, exc: BaseException) -> EngineDeadError:
        """The EngineDeadError behind a call that failed in an agent (its ring closed or
        lost a rank): the watcher's, once it has seen the death."""
        deadline = time.monotonic() + 2.0
        while self._actors.dead is None and not self._actors.stopped \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._actors.dead is not None:
            return self._actors.dead
        return EngineDeadError(f"a node agent failed: {exc}")

    def _wait(self, refs: list[Any], deadline: float | None) -> list[Any]:
        """The agents' replies to one call; TimeoutError past `deadline`, EngineDeadError
        as soon as the watcher sees an actor die."""
        while True:
            self._check_alive()
            timeout = _POLL_S if deadline is None else \
                max(0.0, min(_POLL_S, deadline - time.monotonic()))
            try:
                return ray.get(refs, timeout=timeout)
            except GetTimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    _, pending = ray.wait(refs, num_returns=len(refs), timeout=0)
                    raise TimeoutError([refs.index(ref) for ref in pending]) from None
            except RayError as exc:
                raise self._dead_error(exc) from None

    def _send(self, method: str, args: list, kwargs: dict, reply_rank: int) -> list[Any]:
        self._check_alive()
        if reply_rank == ALL_RANKS:
            reply = [list(range(len(indices))) for indices in self._node_indices]
        else:
            reply = [[pos for pos, i in enumerate(indices) if i == reply_rank]
                     for indices in self._node_indices]
        return self._actors.send(method, args, kwargs, reply_rank, reply)

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None,
                       timeout: float | None = None) -> list[Any]:
        """Call `method` on every worker; one reply per rank, in rank order. Steps still in
        flight are collected first. TimeoutError names the ranks that did not answer."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._pending:
            self._collect_step(deadline)
        refs = self._send(method, list(args), kwargs or {}, ALL_RANKS)
        try:
            per_node = self._wait(refs, deadline)
        except TimeoutError as exc:
            waiting = sorted(self.first_rank + i for node in exc.args[0]
                             for i in self._node_indices[node])
            raise TimeoutError(f"collective_rpc({method!r}) timed out after {timeout} s "
                               f"waiting for ranks {waiting}") from None
        replies: list[Any] = [None] * self.num_workers
        for indices, node_replies in zip(self._node_indices, per_node):
            for i, (ok, payload) in zip(indices, node_replies):
                if not ok:
                    raise RuntimeError(f"{method} failed on worker rank {self.first_rank + i}: "
                                       f"{payload}")
                replies[i] = payload
        return replies

    def execute_model(self, scheduler_output: SchedulerOutput, non_block: bool = False
                      ) -> ModelRunnerOutput | StepFuture:
        refs = self._send("execute_model", [scheduler_output.to_dict()], {}, self.output_rank)
        future = StepFuture(self._collect_step)
        self._pending.append((future, refs))
        return future if non_block else future.result()

    def _collect_step(self, deadline: float | None) -> None:
        """Wait for the oldest step in flight: the output rank's reply."""
        future, refs = self._pending[0]
        try:
            try:
                per_node = self._wait(refs, deadline)
            except TimeoutError:
                raise TimeoutError("execute_model: the output rank's reply did not come "
                                   "back in time") from None
            ok, payload = next(replies[0] for replies in per_node if replies)
            if not ok:
                raise self._step_failure(payload)
        except EngineDeadError as exc:
            for pending, _ in self._pending:
                pending.set_exception(exc)
            self._pending.clear()
            raise
        self._pending.popleft()
        future.set_result(ModelRunnerOutput.from_dict(payload))

    def _step_failure(self, error: str) -> EngineDeadError:
        """The output rank failed a step and stopped; the error also names any actor the
        watcher finds dead (often the cause: a peer's death fails the collectives)."""
        failed = (f"worker rank {self.first_rank + self.output_rank} failed in execute_model "
                  f"and stopped: {error}")
        dead = self._dead_error(RuntimeError(failed))
        if dead is not self._actors.dead:
            return EngineDeadError(failed)
        return EngineDeadError(f"{dead}; {failed}")

    @property
    def node_ranks(self) -> list[list[int]]:
        """The ranks each node agent feeds through its node's ring, one list per node."""
        return [[self.first_rank + i for i in indices] for indices in self._node_indices]

    @property
    def worker_pids(self) -> list[int]:
        """The process ids of this executor's rank actors, in rank order, then its node
        agents'."""
        return list(self._actors.pids)

    def add_death_callback(self, callback: Callable[[EngineDeadError], None]) -> None:
        """Call `callback(error)` from the watcher thread when one of the actors dies."""
        self._actors.on_death.append(callback)

    def fail(self, error: EngineDeadError) -> None:
        self._actors.set_dead(error)

    def shutdown(self) -> None:
        self._finalizer()
