"""The executors of data-parallel engine cores, started together and failing together.

With data_parallel_size = N the engine runs N cores, each with its own executor over its
slice of the rank grid (DP is the outermost dimension, so core d holds the contiguous
global ranks d x ranks_per_core onwards). All ranks of all cores still form one
torch.distributed world, because expert parallelism spans the DP ranks of a stage: every
core's workers rendezvous at one address, and from `init_device` on they meet in
collectives. So the setup phases run on every core at once (one thread per core), the KV
cache is sized once for all cores (the tightest rank of any core), and a worker that dies
in any core stops every core: the others' waiting calls raise the same EngineDeadError
instead of hanging in a collective that will never complete.

On this machine the cores' ranks meet at one file store in a private directory, which the
last core to shut down removes (rendezvous.FileRendezvous); on Ray the cores share one
RayWorld, found by a key, which picks an address on rank 0's node.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
import weakref
from typing import Callable, ContextManager

from shardline.config import EngineConfig, ParallelConfig
from shardline.executor.base import EngineDeadError, Executor, executor_class


class PeerCoreFailed(EngineDeadError):
    """This core stopped because another data-parallel core failed; the message names
    what failed there."""


def _world_rendezvous(parallel: ParallelConfig) -> ContextManager[str]:
    """The `distributed_init_method` of every core, held while the cores start: a
    FileRendezvous on this machine, which the cores keep after that; on Ray the key of
    their RayWorld (unique, so that two engines never share one)."""
    if parallel.distributed_executor_backend == "ray":
        return contextlib.nullcontext(f"shardline-world-{uuid.uuid4().hex}")
    from shardline.executor.rendezvous import FileRendezvous

    return FileRendezvous()


def create_data_parallel_executors(config: EngineConfig) -> list[Executor]:
    """One started executor per data-parallel rank, in DP order, each with a KV cache of
    the same number of blocks. The layout is checked before any process starts (by the
    first executor); if any core fails to start, every core's workers are released before
    the error is raised."""
    parallel = config.parallel
    cls = executor_class(parallel)
    executors: list[Executor] = []
    with _world_rendezvous(parallel) as init_method:
        try:
            for dp_rank in range(parallel.data_parallel_size):
                executors.append(cls(config, dp_rank=dp_rank, initialize=False,
                                     distributed_init_method=init_method))
            link_failures(executors)
            blocks = _on_every_core(executors, lambda executor: executor.load())
            num_blocks = min(blocks)
            _on_every_core(executors, lambda executor: executor.allocate_kv_cache(num_blocks))
        except BaseException:
            for executor in executors:
                executor.shutdown()
            raise
    return executors


def link_failures(executors: list[Executor]) -> None:
    """When a worker of one executor dies, fail every other one with an error that names
    the dead worker and its data-parallel rank (executors that cannot see their workers
    die, such as the in-process one, take no part). The links hold the executors weakly: a
    watcher thread holds its callbacks, and must not keep the other cores from garbage
    collection."""
    refs = [weakref.ref(executor) for executor in executors]

    def fail_others(dp_rank: int) -> Callable[[EngineDeadError], None]:
        def callback(error: EngineDeadError) -> None:
            linked = PeerCoreFailed(f"{error} (in data-parallel rank {dp_rank}; every engine "
                                     "core stops with it)")
            for other, ref in enumerate(refs):
                executor = ref()
                if other != dp_rank and executor is not None:
                    executor.fail(linked)
        return callback

    for dp_rank, executor in enumerate(executors):
        add = getattr(executor, "add_death_callback", None)
        if add is not None:
            add(fail_others(dp_rank))


def _on_every_core(executors: list[Executor], phase: Callable[[Executor], object]) -> list:
    """Run `phase` on every executor at once, one thread each; its results in order.

    The first failure fails every other executor, so that a core waiting in a collective
    for the failed one's ranks wakes up; then the first error is raised, preferring an
    EngineDeadError that is not a consequence of another core's (the root cause).
    """
    results: list[object] = [None] * len(executors)
    errors: list[BaseException | None] = [None] * len(executors)
    failed = threading.Event()

    def run(i: int) -> None:
        try:
            results[i] = phase(executors[i])
        except BaseException as exc:
            errors[i] = exc
            failed.set()

    threads = [threading.Thread(target=run, args=(i,), name=f"shardline-dp-start-{i}",
                                daemon=True) for i in range(len(executors))]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        if failed.wait(0.05):
            cause = next(exc for exc in errors if exc is not None)
            for executor in executors:
                executor.fail(PeerCoreFailed(f"another data-parallel core failed to start: "
                                              f"{cause}"))
            break
    for thread in threads:
        thread.join()
    raised = [exc for exc in errors if exc is not None]
    if raised:
        own = [exc for exc in raised if not isinstance(exc, PeerCoreFailed)]
        raise (own or raised)[0]
    return results
