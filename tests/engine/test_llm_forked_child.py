"""LLM and AsyncLLM in a fork of the process that built them (a fork-based multiprocessing
pool, a prefork server): the copy refuses to run with EngineDeadError, and its shutdown
leaves the parent's engine and workers serving. The child runs a function and reports
through a pipe; every wait is bounded."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import traceback

import pytest

from async_llm_helpers import TIMEOUT, collect, greedy, random_prompt
from engine_prompts import random_prompt as real_prompt
from fake_model import make_engine
from process_hygiene import assert_gone, leaked_segments, shm_segments
from shardline import LLM, AsyncLLM, EngineDeadError, SamplingParams

pytestmark = pytest.mark.usefixtures("no_process_left_behind")


def in_child(run) -> list[str]:
    """Fork, call `run()` in the child, which returns the lines it reports, and return them
    (a traceback's lines if it raised). The child ends by os._exit: no atexit handler or
    finalizer of the parent's objects runs there."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            lines = run()
        except BaseException:
            lines = ["raised"] + traceback.format_exc().splitlines()
        os.write(write_end, "\n".join(lines).encode())
        os._exit(0)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], TIMEOUT)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the forked child did not report in time")
        report = b""
        while chunk := os.read(read_end, 65536):
            report += chunk
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    return report.decode().splitlines()


def refusal(call) -> str:
    """'refused' if `call()` raises the forked child's EngineDeadError, else what it did."""
    try:
        result = call()
    except EngineDeadError as exc:
        return "refused" if "is a fork of it" in str(exc) else f"EngineDeadError: {exc}"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return f"ran: {result!r}"


def test_a_forked_child_cannot_run_or_stop_the_parents_multiprocess_llm(rng):
    """The child's copy sent its steps to the parent's TP2 workers (so steps of two engines
    ran on them), and its shutdown stopped them under the parent, whose next generate
    raised EngineDeadError ('worker rank 0 ... died')."""
    segments_before = shm_segments()
    # Without prefix caching the second run repeats the first's arithmetic: from cached
    # blocks its logprobs move by rounding, which can flip a greedy token at a near tie.
    llm = LLM("tiny-llama", tensor_parallel_size=2, device="cpu", block_size=4,
              num_kv_blocks=64, enable_prefix_caching=False)
    pids = llm.engine.executor.worker_pids
    try:
        params = SamplingParams(temperature=0.0, max_tokens=rng.randint(2, 6), ignore_eos=True)
        prompt = real_prompt(rng, 3, 8)
        expected = list(llm.generate([prompt], params)[0].outputs[0].token_ids)

        def child() -> list[str]:
            report = [refusal(lambda: llm.generate([prompt], params)),
                      refusal(lambda: llm.add_request("r", prompt)),
                      refusal(llm.step), refusal(llm.metrics)]
            llm.shutdown()
            return report

        assert in_child(child) == ["refused"] * 4
        assert list(llm.generate([prompt], params)[0].outputs[0].token_ids) == expected
        assert llm.metrics()["kv_blocks_used"] == 0
    finally:
        llm.shutdown()
    assert_gone(pids)
    assert not leaked_segments(segments_before)


def test_a_forked_child_cannot_use_the_parents_async_llm(rng):
    """The child's copy ran requests on its copy of the parent's engine (an in-process
    engine there hangs in torch's CPU threads), and its shutdown shut down the executor."""
    engine = make_engine()
    llm = AsyncLLM.from_engine(engine)
    prompt, params = random_prompt(rng), greedy(rng.randint(2, 8))

    def stream() -> list:
        return asyncio.run(asyncio.wait_for(collect(llm.generate(prompt, params, "a")),
                                            TIMEOUT))

    expected = [list(o.outputs[0].token_ids) for o in stream()]
    shut_down = []
    engine.executor.shutdown = lambda: shut_down.append(os.getpid())

    def child() -> list[str]:
        report = [refusal(stream), refusal(llm.check_health),
                  refusal(lambda: asyncio.run(llm.metrics())),
                  refusal(lambda: asyncio.run(llm.abort("a")))]
        llm.shutdown()
        return report + [f"shut down by {shut_down}"]

    assert in_child(child) == ["refused"] * 3 + ["ran: None", "shut down by []"]
    assert [list(o.outputs[0].token_ids) for o in stream()] == expected
    llm.shutdown()
    assert shut_down == [os.getpid()]


LEAVING_CHILDREN = """
import gc, os, sys
from shardline import LLM, SamplingParams

params = SamplingParams(temperature=0.0, max_tokens={tokens}, ignore_eos=True)
prompt = {prompt}
if __name__ == "__main__":
    llm = LLM("tiny-llama", tensor_parallel_size=2, device="cpu", block_size=4,
              num_kv_blocks=64, enable_prefix_caching=False)   # as in the test above
    expected = llm.generate([prompt], params)[0].outputs[0].token_ids
    for leave in ("collected", "exit"):
        pid = os.fork()
        if pid == 0:
            if leave == "collected":   # its copy garbage-collected: the finalizer runs
                del llm
                gc.collect()
                os._exit(0)
            sys.exit(0)                # a plain exit: atexit and multiprocessing's handler
        assert os.waitpid(pid, 0)[1] == 0
        after = llm.generate([prompt], params)[0].outputs[0].token_ids
        print(leave, "same tokens" if after == expected else f"{{after}} != {{expected}}")
    llm.shutdown()
"""


def test_a_forked_child_leaving_leaves_the_parents_workers_serving(rng, tmp_path):
    """A child that drops its copy of a TP2 LLM (the executor's finalizer) or just exits
    (the finalizer again, at exit, and multiprocessing's exit handler, which SIGTERMed the
    workers it found listed as the fork's children) stopped the parent's workers: its next
    generate raised 'worker rank 1 ... died'. Run as a script: the child must exit as
    programs do, which a pytest process cannot."""
    script = tmp_path / "leaving_children.py"
    script.write_text(LEAVING_CHILDREN.format(tokens=rng.randint(2, 6),
                                              prompt=real_prompt(rng, 3, 8)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:2] == ["collected same tokens", "exit same tokens"], \
        (done.stdout, done.stderr[-3000:])
