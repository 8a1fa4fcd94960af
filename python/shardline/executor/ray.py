"""Workers on the nodes of a Ray cluster: one actor per rank, one agent per node.

`distributed_executor_backend="ray"` joins the cluster at `ParallelConfig.ray_address`
(or RAY_ADDRESS), or starts a local one, and reserves a placement group that keeps every
TP and SP group inside one node (see ray_placement). Calls reach each node once over Ray,
through that node's agent, and the node's ranks read them from a shared-memory broadcast
ring, as under the multi-process executor (see ray_worker); replies come back over Ray.
The contract is MultiProcExecutor's (both are WorkerGroupExecutors, see worker_group):
one reply per rank from `collective_rpc`, with a timeout that names the ranks that did
not answer; `execute_model` answered by the output rank, blocking or as a StepFuture; and
EngineDeadError for every pending and later call once an actor, or a whole node, dies. A
watcher thread waits on every actor's long-running call (a rank's serving loop, an
agent's `run_until_closed`), which Ray ends with an error when the actor's process or
node dies; an agent's also returns once a rank of its node has stayed stopped (SIGSTOP)
for stopped_workers.STOPPED_LIMIT_S. ray.kill skips the unlink of a ring that not every
reader attached (a start cut short), so shutdown kills the ranks first, then has each
node's agent close its rings and sweep the rings of dead writers on its node (a node
whose agent has died gets a one-off sweep task instead); a rank makes its ring only once
the executor knows its process, so that the sweep can wait for it to end.

The ranks talk NCCL (CUDA) or gloo (CPU) over torch.distributed, rendezvousing at rank
0's node; docs/ray.md lists the network settings that matter across nodes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from typing import Any, Iterator

try:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("distributed_executor_backend='ray' needs Ray: install it with "
                      "pip install 'shardline[ray]'") from exc

from shardline.config import EngineConfig
from shardline.executor import stopped_workers
from shardline.executor.base import EngineDeadError, check_layout
from shardline.executor.multiproc import exit_cause, unreadable_call, unreadable_reply
from shardline.executor.ray_placement import (RayWorld, connect, disconnect, forwarded_env,
                                              ranks_sharing_node, ray_device, sweep_nodes)
from shardline.executor.ray_worker import (AGENT_CONCURRENCY, NodeAgent, RankActor,
                                           UnreadableCall, UnreadableReply, is_failure)
from shardline.executor.stopped_workers import describe_stopped
from shardline.executor.worker_group import RanksTimedOut, WorkerGroup, WorkerGroupExecutor
from shardline.executor.worker_proc import ALL_RANKS, SHUTDOWN
from shardline.ipc import sweep_orphans
from shardline.worker.worker import RANKS_ON_NODE_ENV

logger = logging.getLogger("shardline")

STARTUP_TIMEOUT_S = 180.0
SHUTDOWN_GRACE_S = 5.0
_POLL_S = 0.05
_RankActor = ray.remote(RankActor)
_NodeAgent = ray.remote(NodeAgent)


def _actor_died(ref: Any) -> bool:
    """Whether the actor call behind `ref`, if back, failed because its actor died."""
    ready, _ = ray.wait([ref], timeout=0)
    if not ready:
        return False
    try:
        ray.get(ref)
    except RayActorError:
        return True
    except RayError:
        pass
    return False


class _Actors(WorkerGroup):
    """The actors and placement of one Ray executor: a watched long-running call per
    actor (a rank's serving loop, an agent's `run_until_closed`) that Ray ends with an
    error when the actor's process or node dies."""

    watcher_name = "shardline-ray-watch"

    def __init__(self, first_rank: int) -> None:
        super().__init__(first_rank)
        self.world: RayWorld | None = None
        self.ranks: list[Any] = []  # RankActor handles, in slice order
        self.agents: list[Any] = []  # NodeAgent handles, one per node
        self.agent_nodes: list[str] = []  # the Ray node id of each agent
        self.watched: dict[Any, str] = {}  # long-running call -> what it is
        self.serving: list[Any] = []  # the ranks' serving loops (also in `watched`)
        self.broadcast_of: dict[Any, str] = {}  # serving loop -> the ring it reads
        self.node_ranks_of: dict[Any, list[str]] = {}  # agent's watched call -> its ranks
        self.pids: list[int] = []
        # Per agent, the pid and start time of each of its ranks (for release_rings).
        self.node_rank_starts: list[list[tuple[int, str | None]]] = []
        self.call_ids = itertools.count(1)
        self.connected = True  # the executor's layout check connected to Ray

    def describe_end(self, ref: Any) -> str:
        try:
            code = ray.get(ref, timeout=1.0)
            if ref in self.node_ranks_of:  # an agent that found ranks of its node stopped
                ranks = self.node_ranks_of[ref]
                return "; ".join(describe_stopped(ranks[place], seconds)
                                 for place, seconds in code) or f"{self.watched[ref]} stopped"
            return (f"{self.watched[ref]} stopped with exit code {code}"
                    + exit_cause(code, self.broadcast_of.get(ref)))
        except GetTimeoutError:
            return f"{self.watched[ref]} stopped"
        except RayError as exc:
            reason = str(exc).strip().splitlines()[0]
            return f"{self.watched[ref]} died ({type(exc).__name__}: {reason})"

    def wait_ended(self, timeout: float) -> list[Any] | None:
        refs = list(self.watched)
        try:
            ended, _ = ray.wait(refs, num_returns=1, timeout=timeout)
            if ended:
                ended, _ = ray.wait(refs, num_returns=len(refs), timeout=0.2)
        except Exception:  # Ray shut down under us (interpreter exit)
            return None
        return ended

    def describe_ended(self, ended: list[Any]) -> str:
        return "; ".join(self.describe_end(ref) for ref in ended)

    def send(self, method: str, args: list, kwargs: dict, reply_rank: int,
             reply_indices: list[list[int]]) -> list[Any]:
        """Hand one call to every node's agent; their replies' object refs."""
        call_id = next(self.call_ids)
        message = [call_id, method, args, kwargs, reply_rank]
        return [agent.call.remote(call_id, message, indices)
                for agent, indices in zip(self.agents, reply_indices)]

    def dump_stacks(self) -> str:
        # Waited for, within bounds: a step past its timeout kills the ranks right after.
        refs = [agent.dump_stacks.remote() for group in self.world_groups()
                for agent in group.agents]
        with contextlib.suppress(Exception):  # an agent died: the watcher tells
            ray.wait(refs, num_returns=len(refs), timeout=SHUTDOWN_GRACE_S)
        return ("in the ranks' Ray worker logs (shown by the driver, each line under its "
                "actor's pid, unless Ray was started with log_to_driver=False)")

    def stop_workers(self) -> None:
        """Ask the ranks to stop, kill them, have the node agents release their nodes'
        rings, then kill the agents."""
        try:
            if self.agents and self.dead is None and self.watched:
                self.send(SHUTDOWN, [], {}, ALL_RANKS, [[] for _ in self.agents])
                ray.wait(self.serving, num_returns=len(self.serving),
                         timeout=SHUTDOWN_GRACE_S)
            for actor in self.ranks:
                ray.kill(actor, no_restart=True)
            self.release_rings()
            for actor in self.agents:
                ray.kill(actor, no_restart=True)
            if self.watched:
                ray.wait(list(self.watched), num_returns=len(self.watched),
                         timeout=SHUTDOWN_GRACE_S)
        except Exception as exc:  # Ray already shut down (interpreter exit)
            logger.debug("stopping the Ray actors failed: %s", exc)

    def release_rings(self) -> None:
        """Each live agent closes its rings and, once its node's ranks have ended, sweeps
        the rings of dead writers there (NodeAgent.release_rings): ray.kill skips the
        unlink of a ring that not every reader attached, such as a response ring of a
        rank killed at start or a broadcast ring that a dead rank never attached. A
        dead agent's call fails at once, and a task pinned to its node sweeps there
        instead (ray_placement.sweep_nodes). A rank makes its ring only once the start
        knows its process (`_launch`), so every rank that may hold one is waited for."""
        nodes = self.node_rank_starts or [[] for _ in self.agents]
        refs = [agent.release_rings.remote(ranks, SHUTDOWN_GRACE_S)
                for agent, ranks in zip(self.agents, nodes)]
        ray.wait(refs, num_returns=len(refs), timeout=2 * SHUTDOWN_GRACE_S)
        dead = [place for place, ref in enumerate(refs) if _actor_died(ref)]
        if dead:  # its node is swept by a task pinned there
            sweep_nodes([self.agent_nodes[place] for place in dead],
                        [nodes[place] for place in dead], SHUTDOWN_GRACE_S)

    def release(self) -> None:
        """Sweep the rings of dead writers on this node (those of an agent that died
        before its ranks attached its broadcast ring), give back the placement group,
        and Ray if this process started it."""
        with contextlib.suppress(OSError):  # /dev/shm unlistable: nothing to sweep
            sweep_orphans()
        if self.world is not None:
            self.world.release()
        if self.connected:
            disconnect()


class RayExecutor(WorkerGroupExecutor):
    """Runs one actor per rank on a Ray cluster and drives them through node agents."""

    _group: _Actors

    def _check_layout(self) -> None:
        parallel = self.config.parallel
        connect(parallel.ray_address, parallel.world_size)
        try:
            self.device_type = ray_device(parallel.device)
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

    def _new_group(self) -> _Actors:
        return _Actors(self.first_rank)

    def _launch(self) -> None:
        parallel = self.config.parallel
        actors = self._group
        actors.world = world = RayWorld.acquire(parallel, self.device_type,
                                                self.distributed_init_method)
        config = self.config.to_dict()
        config["parallel"]["device"] = self.device_type
        env = forwarded_env()
        options = dict(num_cpus=1, num_gpus=1 if self.device_type == "cuda" else 0)
        # Every core's ranks count (under data parallelism, other cores' share nodes too).
        sharing = ranks_sharing_node([world.node_of(rank) for rank in range(parallel.world_size)])
        ranks = range(self.first_rank, self.first_rank + self.num_workers)
        actors.ranks = [_RankActor.options(
            scheduling_strategy=world.strategy(rank),
            runtime_env={"env_vars": {**env, RANKS_ON_NODE_ENV: str(sharing[rank])}}, **options)
            .remote(rank, logger.getEffectiveLevel()) for rank in ranks]
        # One agent per node, in the order of each node's first rank, started meanwhile.
        self.rank_nodes = [world.node_of(rank) for rank in ranks]
        nodes = list(dict.fromkeys(self.rank_nodes))
        self._node_indices = [[i for i, n in enumerate(self.rank_nodes) if n == node]
                              for node in nodes]
        actors.agent_nodes = nodes
        actors.agents = [_NodeAgent.options(
            num_cpus=0, max_concurrency=AGENT_CONCURRENCY,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
            for node in nodes]
        # The ranks' processes first, their rings after: a start cut short then knows the
        # process of every rank that may hold a ring, and its sweep waits for them to end.
        started = self._get([actor.identify.remote() for actor in actors.ranks], "start")
        actors.pids = [info["pid"] for info in started]
        actors.node_rank_starts = [[(started[i]["pid"], started[i]["started"])
                                    for i in indices] for indices in self._node_indices]
        infos = self._get([actor.describe.remote() for actor in actors.ranks], "describe")
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
                actors.broadcast_of[ref] = broadcast.name
        self._get([agent.wait_attached.remote(STARTUP_TIMEOUT_S,
                                              [infos[i]["pid"] for i in indices])
                   for agent, indices in zip(actors.agents, self._node_indices)], "attach")
        for agent, indices, (_, agent_pid) in zip(actors.agents, self._node_indices, wired):
            ref = agent.run_until_closed.remote(stopped_workers.STOPPED_LIMIT_S)
            actors.watched[ref] = (
                f"node agent of ranks {[self.first_rank + i for i in indices]} (pid {agent_pid})")
            actors.node_ranks_of[ref] = [f"worker rank {self.first_rank + i} (pid "
                                         f"{infos[i]['pid']})" for i in indices]
        actors.mark_serving(world)

    def _get(self, refs: list[Any], phase: str) -> list[Any]:
        """Results of startup calls; EngineDeadError if one fails, a rank's serving loop
        ends, or they take longer than STARTUP_TIMEOUT_S."""
        ranks = list(self._group.watched)
        ready, pending = ray.wait(refs + ranks, num_returns=len(refs), timeout=STARTUP_TIMEOUT_S)
        ended = [ref for ref in ranks if ref in ready]
        if ended:
            raise EngineDeadError(f"while starting ({phase}): "
                                  + "; ".join(self._group.describe_end(ref) for ref in ended))
        if any(ref in pending for ref in refs):
            raise EngineDeadError(f"the Ray actors did not {phase} within "
                                  f"{STARTUP_TIMEOUT_S:.0f} s")
        try:
            return ray.get(refs)
        except RayError as exc:
            raise EngineDeadError(f"a Ray actor failed to {phase}: {exc}") from None

    def _wait(self, refs: list[Any], deadline: float | None, early_failure: bool = False
              ) -> list[Any]:
        """The agents' replies to one call; RanksTimedOut past `deadline`, EngineDeadError
        as soon as the watcher sees an actor die. With `early_failure`, see `_answered`."""
        while True:
            self._group.check_alive()
            timeout = _POLL_S if deadline is None else \
                max(0.0, min(_POLL_S, deadline - time.monotonic()))
            try:
                replies = self._answered(refs, timeout, early_failure)
            except RayError as exc:
                # An agent's ring closed or lost a rank: the watcher names the death.
                raise self._group.dead_error(f"a node agent failed: {exc}") from None
            if replies is not None:
                return replies
            if deadline is not None and time.monotonic() >= deadline:
                _, pending = ray.wait(refs, num_returns=len(refs), timeout=0)
                nodes = [refs.index(ref) for ref in pending]
                raise RanksTimedOut(sorted(self.first_rank + i for node in nodes
                                           for i in self._node_indices[node]))

    def _answered(self, refs: list[Any], timeout: float, early_failure: bool
                  ) -> list[Any] | None:
        """The agents' replies once all are back (within `timeout`), else None. With
        `early_failure`, also once those back report a rank's failure, with None for each
        rank of the agents still out (which may wait for it in a collective)."""
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if len(ready) == len(refs):
            return ray.get(refs)
        if not early_failure or not ready:
            return None
        answered = dict(zip(ready, ray.get(ready)))
        if not any(is_failure(reply) for replies in answered.values() for reply in replies):
            return None
        return [answered[ref] if ref in answered else [None] * len(indices)
                for ref, indices in zip(refs, self._node_indices)]

    def _send(self, method: str, args: list, kwargs: dict, reply_rank: int) -> list[Any]:
        self._group.check_alive()
        if reply_rank == ALL_RANKS:
            reply = [list(range(len(indices))) for indices in self._node_indices]
        else:
            reply = [[pos for pos, i in enumerate(indices) if i == reply_rank]
                     for indices in self._node_indices]
        return self._group.send(method, args, kwargs, reply_rank, reply)

    def _call_all(self, method: str, args: list, kwargs: dict, deadline: float | None
                  ) -> Iterator[tuple[int, bool, Any]]:
        per_node = self._wait(self._send(method, args, kwargs, ALL_RANKS), deadline,
                              early_failure=True)
        replies = [(i, reply) for indices, node_replies in zip(self._node_indices, per_node)
                   for i, reply in zip(indices, node_replies)]
        # The replies in rank order, those of ranks that did not answer (None) last: there
        # are such only where another rank failed, which comes first and is raised.
        for i, reply in sorted(replies, key=lambda item: item[1] is None):
            yield i, *self._checked(i, reply)

    def _send_step(self, step: dict) -> list[Any]:
        return self._send("execute_model", [step], {}, self.output_rank)

    def _read_step(self, refs: list[Any], deadline: float | None) -> tuple[bool, Any]:
        try:
            per_node = self._wait(refs, deadline)
        except RanksTimedOut:
            raise TimeoutError("execute_model: the output rank's reply did not come "
                               "back in time") from None
        return self._checked(self.output_rank,
                             next(replies[0] for replies in per_node if replies))

    def _checked(self, index: int, reply: list | UnreadableReply | UnreadableCall
                 ) -> tuple[bool, Any]:
        """(ok, payload) of the reply of the rank at `index` in the slice, as a node agent
        returned it; EngineDeadError, worded as by the multi-process executor, where the
        agent found no readable reply on the rank's ring or the rank could not read a call."""
        rank = self.first_rank + index
        if isinstance(reply, UnreadableReply):
            error = unreadable_reply(rank, reply.ring, reply.error)
            self._group.set_dead(error)
            raise self._group.dead or error
        if isinstance(reply, UnreadableCall):
            raise self._group.rank_failure(unreadable_call(rank, reply.ring), reply.error)
        ok, payload = reply
        return ok, payload

    @property
    def node_ranks(self) -> list[list[int]]:
        """The ranks each node agent feeds through its node's ring, one list per node."""
        return [[self.first_rank + i for i in indices] for indices in self._node_indices]

    @property
    def worker_pids(self) -> list[int]:
        """The process ids of this executor's rank actors, in rank order, then its node
        agents'."""
        return list(self._group.pids)
