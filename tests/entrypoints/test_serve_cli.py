"""`shardline serve` from the command line: it serves, answers, and stops on Ctrl-C."""

import concurrent.futures
import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from typing import IO

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (test extra) is not installed")

from shardline.cli import main  # noqa: E402

STARTUP_S = 120.0


# What uvicorn prints once it listens; with --port 0 it names the port the kernel gave.
LISTENING = re.compile(r"Uvicorn running on (http://127\.0\.0\.1:\d+)")


def read_until_listening(stdout: IO[str], found: queue.Queue) -> None:
    """Puts (URL or None if the output ended first, the lines read) on `found`; stops
    reading there, so that the test reads the rest."""
    lines = []
    for line in stdout:
        lines.append(line)
        if match := LISTENING.search(line):
            found.put((match.group(1), "".join(lines)))
            return
    found.put((None, "".join(lines)))


@pytest.mark.parametrize("flag, value, rule", [
    ("--port", "70000", "must be in [0, 65535]"),
    ("--shutdown-timeout", "-1.0", "must be a finite number of seconds, 0 or more"),
    ("--shutdown-timeout", "nan", "must be a finite number of seconds, 0 or more")])
def test_bad_flag_is_one_line_and_exit_2(capsys, flag, value, rule):
    assert main(["serve", "tiny-llama", flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"shardline serve: error: {flag} {value} is invalid: {rule}"]


@pytest.mark.parametrize("argv, message", [
    (["serve", "tiny-llama", "-m", "small-llama"],
     "MODEL 'tiny-llama' and --model 'small-llama' name different models: give one of them"),
    (["serve", "--model", "tiny-qwen2", "tiny-llama"],
     "MODEL 'tiny-llama' and --model 'tiny-qwen2' name different models: give one of them"),
    (["serve", "tiny-llama", "--served-model-name", " "],
     "--served-model-name ' ' is invalid: must be a name clients can send as the model, "
     "not empty")])
def test_conflicting_or_empty_names_are_refused_before_loading(capsys, monkeypatch, argv,
                                                              message):
    """A MODEL and a different --model, or an empty served name, were taken silently: the
    server loaded MODEL alone, or served under the model's name instead. Refused before
    the model is looked up (a serve that gets that far fails the test at once)."""
    import shardline.cli_commands

    def model_looked_up(model: str) -> None:
        raise AssertionError(f"serve went on to look up {model!r}")

    monkeypatch.setattr(shardline.cli_commands, "_check_model", model_looked_up)
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"shardline serve: error: {message}"]


@contextlib.contextmanager
def serving(*flags: str):
    """`shardline serve tiny-llama` in a subprocess on a port the kernel picks (one probed
    free beforehand could be taken before the server binds it), up and answering /health;
    yields the process, its URL and what it printed until it listened, and kills it if the
    test left it running."""
    env = dict(os.environ, SHARDLINE_DISABLE_TRITON="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardline.cli", "serve", "tiny-llama", "--port", "0",
         "--device", "cpu", "--served-model-name", "tiny", *flags],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        found: queue.Queue = queue.Queue()
        threading.Thread(target=read_until_listening, args=(proc.stdout, found),
                         daemon=True).start()
        try:
            url, startup = found.get(timeout=STARTUP_S)
        except queue.Empty:
            raise AssertionError(f"serve did not listen within {STARTUP_S} s") from None
        assert url is not None, f"serve exited early: {startup}"
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert proc.poll() is None, f"serve exited early: {startup}{proc.stdout.read()}"
            assert time.monotonic() < deadline, "serve did not come up"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield proc, url, startup
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


@pytest.mark.parametrize("layout, presses", [([], 1), (["-tp", "2"], 2)],
                         ids=["one-rank", "tp2-pressed-twice"])
def test_serve_answers_and_stops_on_ctrl_c(layout, presses):
    with serving(*layout) as (proc, url, startup):
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
        output = startup + proc.stdout.read()
        assert "Traceback" not in output and "ERROR" not in output, output


def test_sigterm_while_the_model_loads_stops_the_workers_as_ctrl_c_does():
    """Python's default SIGTERM killed serve at once while its workers started, leaving
    them to notice their parent's death and its semaphores to the resource tracker."""
    import psutil
    from process_hygiene import leaked_segments, shm_segments
    segments = shm_segments()
    env = dict(os.environ, SHARDLINE_DISABLE_TRITON="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardline.cli", "serve", "tiny-llama", "--port", "0",
         "--device", "cpu", "-tp", "2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + STARTUP_S
        while len(workers := [c for c in psutil.Process(proc.pid).children()
                              if "resource_tracker" not in " ".join(c.cmdline())]) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
        output = proc.stdout.read()
        assert output.strip().endswith("shardline serve: interrupted"), output
        assert "leaked" not in output and "Traceback" not in output, output
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE
                       for w in workers)
        assert not leaked_segments(segments)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_ctrl_c_cancels_running_requests_after_the_shutdown_timeout():
    """Two long requests (each about a minute of steps: 128 completions, one sequence a
    step) are running when Ctrl-C comes; after the 1 s timeout both end, each telling its
    client why, and the server exits, instead of waiting for them."""
    long = {"model": "tiny", "prompt": "hi", "max_tokens": 400, "n": 128, "ignore_eos": True}
    with serving("--max-num-seqs", "1", "--shutdown-timeout", "1") as (proc, url, startup):
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            whole = pool.submit(httpx.post, url + "/v1/completions", json=long, timeout=120)
            streamed = pool.submit(httpx.post, url + "/v1/completions", timeout=120,
                                   json={**long, "stream": True})
            deadline = time.monotonic() + 30
            while "shardline_num_requests_waiting 1" not in httpx.get(url + "/metrics",
                                                                      timeout=30).text:
                assert time.monotonic() < deadline, "the two requests did not both arrive"
                time.sleep(0.1)
            stopped_at = time.monotonic()
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 0
            assert time.monotonic() - stopped_at < 15
            whole, streamed = whole.result(), streamed.result()
        assert whole.status_code == 503
        assert "shutting down" in whole.json()["error"]["message"]
        assert streamed.status_code == 200
        last = streamed.text.strip().split("\n\n")[-1]
        assert "shutting down" in json.loads(last.removeprefix("data: "))["error"]["message"]
        assert "Traceback" not in startup + proc.stdout.read()
