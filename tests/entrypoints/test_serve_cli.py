"""`shardline serve` from the command line: it serves, answers, and stops on Ctrl-C."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (test extra) is not installed")

from shardline.cli import main  # noqa: E402

STARTUP_S = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_bad_port_is_one_line_and_exit_2(capsys):
    assert main(["serve", "tiny-llama", "--port", "70000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["shardline serve: error: --port 70000 is invalid: must be in [0, 65535]"]


@pytest.mark.parametrize("layout, presses", [([], 1), (["-tp", "2"], 2)],
                         ids=["one-rank", "tp2-pressed-twice"])
def test_serve_answers_and_stops_on_ctrl_c(layout, presses):
    port = free_port()
    env = dict(os.environ, SHARDLINE_DISABLE_TRITON="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardline.cli", "serve", "tiny-llama", "--port", str(port),
         "--device", "cpu", "--served-model-name", "tiny", *layout],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert proc.poll() is None, f"serve exited early: {proc.stdout.read()}"
            assert time.monotonic() < deadline, "serve did not come up"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        reply = httpx.post(url + "/v1/completions", timeout=60,
                           json={"model": "tiny", "prompt": "hi", "max_tokens": 3,
                                 "ignore_eos": True})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 3
        for _ in range(presses):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.02)
        # A second press may end the process by the signal itself, as it asks.
        assert proc.wait(timeout=60) in ((0,) if presses == 1 else (0, -signal.SIGINT))
        # A second Ctrl-C while the engine shut down cancelled uvicorn's lifespan task,
        # logged as an ERROR with two tracebacks.
        output = proc.stdout.read()
        assert "Traceback" not in output and "ERROR" not in output, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
