"""A program that leaves while its AsyncLLM is inside a step, without shutdown: the engine
thread (a daemon) finishes that step before the interpreter finalizes. One still running
then aborted the program now and then ('terminate called without an active exception',
exit status 134): torch, freeing a tensor, gives up the GIL, and a finalizing interpreter
ends a thread that takes it back from inside C++. Each case runs as a script, since only a
program's real exit shows it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

LEAVING = """
import asyncio, atexit, sys, threading, time
sys.path.insert(0, {tests!r})
from fake_model import make_engine
from shardline import AsyncLLM, SamplingParams
from shardline.engine import async_llm

def at_finalization():  # registered first, so it runs after every later exit hook
    running = any(t.name == "shardline-engine" for t in threading.enumerate())
    print("engine thread at finalization:", "running" if running else "ended", flush=True)
atexit.register(at_finalization)

async_llm.EXIT_WAIT_S = {exit_wait}
engine = make_engine()
real_step, entered = engine.step, threading.Event()
def slow_step():
    entered.set()
    time.sleep({step_s})  # the program leaves while this step runs
    return real_step()
engine.step = slow_step

llm = AsyncLLM.from_engine(engine)
async def consume():
    async for _ in llm.generate([1, 2, 3], SamplingParams(max_tokens=50), "r"):
        pass
# The consumer's loop runs in a thread of its own, as a server's may: the main thread
# leaves without cancelling it (which would wait for the step to take the abort).
threading.Thread(target=asyncio.run, args=(consume(),), daemon=True).start()
entered.wait()
print("leaving without shutdown", flush=True)
"""


def leave(tmp_path, step_s: float, exit_wait: float) -> tuple[subprocess.CompletedProcess, float]:
    script = tmp_path / "leaving.py"
    script.write_text(LEAVING.format(tests=os.path.dirname(__file__), step_s=step_s,
                                     exit_wait=exit_wait))
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)
    return done, time.monotonic() - start


def test_the_engine_thread_ends_its_step_before_the_interpreter_finalizes(tmp_path, rng):
    done, _ = leave(tmp_path, step_s=rng.uniform(0.2, 0.6), exit_wait=30.0)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["leaving without shutdown",
                                        "engine thread at finalization: ended"], done.stderr


def test_a_step_that_does_not_end_holds_the_exit_only_so_long(tmp_path, rng):
    """EXIT_WAIT_S bounds the wait: a hung step must not make the program hang."""
    done, elapsed = leave(tmp_path, step_s=600.0, exit_wait=rng.uniform(0.2, 1.0))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "engine thread at finalization: running"
    assert elapsed < 60.0
