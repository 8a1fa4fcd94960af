"""A corrupt frame on the multi-process executor's rings: one the executor reads from a
worker's response ring kills the engine with an error naming the rank and the ring; one a
worker reads from the broadcast ring is reported by that worker as its failure. Either
way no call hangs, and shutdown leaves no process and nothing in /dev/shm."""

from __future__ import annotations

import logging
import time

import pytest

from shardline.executor import EngineDeadError
from shardline.executor.multiproc import MultiProcExecutor
from process_hygiene import assert_gone, leaked_segments, shm_segments
from stub_workers import corrupting_encode, patch_once
from multiproc_helpers import make_config, step

# How each kind of corrupt frame (stub_workers.corrupt_frame) is described
KINDS = {"msgpack": "is malformed: FormatError", "length": "is truncated",
         "not_a_message": "not a"}
# A corrupt frame must fail the call at once; the timeout only keeps a hang from hanging
# the test run.
CALL_TIMEOUT_S = 30


def start(tp: int = 2) -> MultiProcExecutor:
    return MultiProcExecutor(make_config("CorruptingWorker", tensor_parallel_size=tp))


def check_dead_and_clean(executor: MultiProcExecutor, before: set[str]) -> None:
    """Later calls raise EngineDeadError too (naming the first worker seen to stop), and
    shutdown leaves nothing behind."""
    with pytest.raises(EngineDeadError, match=r"worker rank \d"):
        executor.execute_model(step("after"))
    pids = executor.worker_pids
    executor.shutdown()
    assert_gone(pids)
    assert not leaked_segments(before)


def wait_logged(caplog, lines: list[str]) -> None:
    """Wait for the log relay to pass on every one of `lines` (within 5 s)."""
    deadline = time.monotonic() + 5
    while any(line not in caplog.text for line in lines) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert all(line in caplog.text for line in lines), caplog.text


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("call", ["collective_rpc", "execute_model"])
def test_a_corrupt_reply_kills_the_engine_naming_the_rank_and_its_ring(kind, call, rng):
    before = shm_segments()
    executor = start()
    # execute_model is answered by the output rank (0) alone; collective_rpc by both
    rank = rng.randrange(2) if call == "collective_rpc" else executor.output_rank
    ring = executor._group.worker_response_mqs[rank].handle().name
    executor.collective_rpc("corrupt_reply", args=(rank, kind, 1), timeout=CALL_TIMEOUT_S)
    started = time.monotonic()
    expected = (rf"could not read a reply of worker rank {rank} from its response ring "
                rf"'{ring}': .*{KINDS[kind]}")
    with pytest.raises(EngineDeadError, match=expected):
        if call == "collective_rpc":
            executor.collective_rpc("identity", timeout=CALL_TIMEOUT_S)
        else:
            executor.execute_model(step("a"))
    assert time.monotonic() - started < 5.0
    check_dead_and_clean(executor, before)


def test_a_step_reply_corrupted_into_other_data_kills_the_engine_naming_the_rank(rng):
    """A flipped byte in a key of a step's reply leaves a sound frame of other data: the
    step fails with EngineDeadError, as do the steps in flight behind it."""
    before = shm_segments()
    executor = start()
    rank = executor.output_rank
    executor.collective_rpc("corrupt_reply", args=(rank, "renamed_key", 1),
                            timeout=CALL_TIMEOUT_S)
    futures = [executor.execute_model(step(f"r{i}"), non_block=True)
               for i in range(rng.randint(1, 4))]
    for future in futures:
        with pytest.raises(EngineDeadError, match=f"reply of worker rank {rank} to a step is "
                                                  "not a ModelRunnerOutput .*KeyError"):
            future.result(timeout=CALL_TIMEOUT_S)
    check_dead_and_clean(executor, before)


@pytest.mark.parametrize("kind", KINDS)
def test_a_corrupt_call_on_the_broadcast_ring_fails_every_worker_with_its_error(kind, rng,
                                                                                 caplog):
    """The executor writes a corrupt frame in place of a call: the ranks each report that
    they could not read it, log why and stop, and the call fails naming one of them."""
    before = shm_segments()
    executor = start()
    ring = executor._group.rpc_broadcast_mq.handle().name
    patch_once(type(executor._group.rpc_broadcast_mq._encoder), "encode",
               corrupting_encode(kind))
    started = time.monotonic()
    # The error is the rank's report, or the first rank seen stopping (its log says why)
    expected = rf"worker rank \d .*could not read a call from the broadcast ring '{ring}'"
    with caplog.at_level(logging.ERROR, logger="shardline"):
        with pytest.raises(EngineDeadError, match=expected):
            if rng.random() < 0.5:
                executor.collective_rpc("identity", timeout=CALL_TIMEOUT_S)
            else:
                executor.execute_model(step("a"))
        assert time.monotonic() - started < 5.0
        wait_logged(caplog, [f"[rank {rank}] could not read a call from the broadcast ring "
                             f"'{ring}': " for rank in (0, 1)])
    assert KINDS[kind] in caplog.text
    check_dead_and_clean(executor, before)


def test_a_rank_that_cannot_read_a_call_reports_it_and_the_call_fails_naming_it(rng, caplog):
    """One rank of four reads a corrupt call (the others read it whole): the call fails
    with that rank's error, its log says why, and the healthy ranks are stopped."""
    before = shm_segments()
    executor = start(tp=4)
    rank = rng.randrange(4)
    kind = rng.choice(list(KINDS))
    executor.collective_rpc("corrupt_next_call", args=(rank, kind), timeout=CALL_TIMEOUT_S)
    logged = f"[rank {rank}] could not read a call from the broadcast ring"
    with caplog.at_level(logging.ERROR, logger="shardline"):
        with pytest.raises(EngineDeadError, match=f"worker rank {rank} .*could not read a "
                                                  "call from the broadcast ring"):
            executor.collective_rpc("identity", timeout=CALL_TIMEOUT_S)
        wait_logged(caplog, [logged])
    check_dead_and_clean(executor, before)
