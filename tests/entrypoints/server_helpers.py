"""The server the entrypoint tests talk to: `shardline serve`'s app on tiny-llama (with a
chat template added), run by uvicorn in a thread on a free local port, and helpers that
ask the same engine directly or wait, always within TIMEOUT."""

import asyncio
import random
import threading
import time
from contextlib import contextmanager

MODEL = "tiny-chat"
TIMEOUT = 30.0


@contextmanager
def running_app(app):
    """Run the app under uvicorn on a free local port in a thread and yield its base URL;
    on exit, stop the server and check that its thread ended."""
    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + TIMEOUT
        while not srv.started:
            assert thread.is_alive(), "the server thread ended during startup"
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(TIMEOUT)
    assert not thread.is_alive(), "the server thread did not stop"


def random_text(rng, low=3, high=20):
    return "".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(low, high)))


def direct(llm, prompt, params):
    """The engine's own final output for `prompt`, bypassing HTTP."""
    async def run():
        final = None
        async for output in llm.generate(prompt, params, f"direct-{random.random()}"):
            final = output
        return final
    return asyncio.run(asyncio.wait_for(run(), TIMEOUT))


def wait_until(condition, what):
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def engine_idle(llm):
    engine = llm.engine
    return (not engine.has_unfinished_requests()
            and engine.kv.num_free_blocks == engine.kv.num_blocks)
