"""`shardline serve` takes its address before the model loads, and stops cleanly on SIGTERM."""

import signal
import socket

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")

from shardline import cli, cli_commands  # noqa: E402
from shardline.entrypoints import app  # noqa: E402
from test_serve_cli import serving  # noqa: E402


@pytest.fixture
def refuse_to_load(monkeypatch):
    def load(args):
        raise AssertionError(f"{args.model} was loaded")
    monkeypatch.setattr(cli_commands, "_build_llm", load)


def test_an_address_in_use_fails_before_the_model_loads(refuse_to_load, capsys):
    """uvicorn found it only after the load, logged its own error and exited 3, after the
    command had said it was serving there."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "tiny-llama", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"shardline serve: error: --host 127.0.0.1 --port {port}: cannot listen "
                   "there (Address already in use): choose another --port or --host"]


def test_a_host_that_does_not_resolve_fails_before_the_model_loads(refuse_to_load, rng,
                                                                   capsys):
    host = "".join(rng.choice("abcdefghij") for _ in range(12)) + ".invalid"
    assert cli.main(["serve", "tiny-llama", "--host", host, "--port", "0"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"shardline serve: error: --host {host!r} is neither an address "
                           "nor a name this machine resolves (")


def test_every_address_of_the_host_is_bound_on_one_port(monkeypatch):
    """uvicorn binds every address a host resolves to ("localhost": 127.0.0.1 and ::1 on
    many machines); the first pre-bound version bound the first alone, so a client of the
    other got no answer. With port 0 the second address takes the port the first got."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    resolve = socket.getaddrinfo

    def both(host, port, *args, **kwargs):
        assert host == "either-host"
        return [*resolve("127.0.0.1", port, *args, **kwargs),
                *resolve("::1", port, *args, **kwargs)]
    monkeypatch.setattr(app.socket, "getaddrinfo", both)
    sockets = app.listen_sockets("either-host", 0)
    try:
        bound = [sock.getsockname()[:2] for sock in sockets]
        assert [host for host, _ in bound] == ["127.0.0.1", "::1"]
        assert bound[0][1] == bound[1][1] > 0
    finally:
        for sock in sockets:
            sock.close()


def test_sigterm_shuts_the_engine_down_and_exits_0():
    """uvicorn raised SIGTERM again after its own shutdown, and its default action killed
    the process before the engine's: exit -15, and the workers' semaphores were left to
    multiprocessing's resource tracker, which warned of them."""
    with serving("-tp", "2") as (proc, url, startup):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        output = startup + proc.stdout.read()
    assert "leaked" not in output and "Traceback" not in output, output
