"""The online runner against `shardline serve`'s app on tiny-llama (run by uvicorn in a
thread, as the entrypoint tests run it): what the server refuses or fails mid-stream is
a failed request, and the counts come from its usage chunk."""

import asyncio
import json
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx", reason="httpx (test extra) is not installed")
pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "entrypoints"))
from server_helpers import MODEL, TIMEOUT, random_text, running_app  # noqa: E402

from shardline.benchmark.online import ServerTarget, run_online  # noqa: E402
from shardline.benchmark.workload import Workload  # noqa: E402
from shardline.sampling_params import SamplingParams  # noqa: E402

MAX_MODEL_LEN = 64
FAIL_MARK = 7   # a prompt holding this token id fails after its first output


@pytest.fixture(scope="module")
def server(tiny_chat_model):
    """(AsyncLLM, base URL); the engine's generate fails any request whose prompt holds
    FAIL_MARK once it has produced its first output, as an engine error mid-stream."""
    from shardline.engine.async_llm import AsyncLLM
    from shardline.entrypoints.app import build_app

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SHARDLINE_DISABLE_TRITON", "1")   # the torch reference: fast steps
        llm = AsyncLLM(tiny_chat_model, block_size=4, num_kv_blocks=256,
                       max_model_len=MAX_MODEL_LEN)
        generate = llm.generate

        async def failing_generate(prompt, params, request_id, prompt_token_ids=None):
            outputs = generate(prompt, params, request_id, prompt_token_ids)
            try:
                async for output in outputs:
                    yield output
                    if FAIL_MARK in output.prompt_token_ids:
                        raise RuntimeError(f"step failed for {request_id}")
            finally:
                await outputs.aclose()

        patch.setattr(llm, "generate", failing_generate)
        try:
            with running_app(build_app(llm, MODEL)) as url:
                yield llm, url
        finally:
            llm.shutdown()


def run(url, workload, rate=float("inf")):
    async def go():
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            return await run_online(ServerTarget(url, MODEL, client, TIMEOUT), workload, rate)
    return asyncio.run(go()).summary()


def ids(rng, length):
    return [rng.randrange(8, 300) for _ in range(length)]


def test_an_error_event_mid_stream_is_a_failed_request(server, rng):
    """shardline serve ends a stream whose request the engine failed with an error event
    (its 200 already sent); the run counted it a success."""
    count = rng.randint(3, 6)
    failing = set(rng.sample(range(count), rng.randint(1, count - 1)))
    prompts = [ids(rng, rng.randint(2, 10)) for _ in range(count)]
    for i in failing:
        prompts[i][rng.randrange(len(prompts[i]))] = FAIL_MARK
    workload = Workload(prompts, [rng.randint(3, 8) for _ in range(count)])
    summary = run(server[1], workload)
    assert summary["failed_requests"] == len(failing)
    assert summary["finished_requests"] == count - len(failing)
    assert summary["output_tokens"] == sum(workload.max_tokens[i] for i in range(count)
                                           if i not in failing)
    prefix = (f"RuntimeError: {server[1]}/v1/completions ended the stream with an error: "
              "step failed for ")
    assert len(summary["errors"]) == min(len(failing), 5)
    for error in summary["errors"]:
        assert error["error"].startswith(prefix) and error["requests"] == 1, error


def test_a_refused_request_is_a_failed_request_naming_the_status(server, rng):
    count = rng.randint(3, 6)
    too_long = rng.randrange(count)
    prompts = [ids(rng, MAX_MODEL_LEN + rng.randint(1, 20) if i == too_long
                   else rng.randint(2, 10)) for i in range(count)]
    workload = Workload(prompts, [rng.randint(2, 6) for _ in range(count)])
    summary = run(server[1], workload)
    assert summary["failed_requests"] == 1 and summary["finished_requests"] == count - 1
    [error] = summary["errors"]
    assert error["error"].startswith(f"RuntimeError: {server[1]}/v1/completions answered "
                                     "400: "), error
    assert f"prompt has {len(prompts[too_long])} tokens" in error["error"]


@pytest.mark.parametrize("body", [
    b'data: {"choices": [{"index": 0, "text": "a"}]}\n\n',
    b'data: {"choices": [{"index": 0, "text": "a"}]}\n\ndata: {"choices": [{"index": 0, '
    b'"text": "b"}]}\n\n',
], ids=["one-chunk", "two-chunks"])
def test_a_stream_cut_before_done_is_a_failed_request(body):
    """A server that stops mid-stream without an error event (it died, a proxy cut it)."""
    def answer(request):
        return httpx.Response(200, content=body,
                              headers={"content-type": "text/event-stream"})

    async def go():
        transport = httpx.MockTransport(answer)
        async with httpx.AsyncClient(transport=transport) as client:
            target = ServerTarget("http://bench.test", MODEL, client, TIMEOUT)
            return await run_online(target, Workload([[9, 10]], [4]), float("inf"))
    summary = asyncio.run(go()).summary()
    assert summary["failed_requests"] == 1 and summary["finished_requests"] == 0
    assert summary["errors"][0]["error"] == ("RuntimeError: http://bench.test/v1/completions's "
                                             "stream ended without its final 'data: [DONE]'")


def test_counts_come_from_the_usage_chunk(server, rng):
    """Text prompts counted 0 input tokens against a server; the server's usage says how
    many the engine read."""
    llm, url = server
    count = rng.randint(2, 6)
    prompts = [random_text(rng) for _ in range(count)]
    workload = Workload(prompts, [rng.randint(1, 6) for _ in range(count)])
    lengths = [len(llm.engine.encode_prompt(p, SamplingParams(max_tokens=n))[1])
               for p, n in zip(prompts, workload.max_tokens)]
    summary = run(url, workload)
    assert summary["failed_requests"] == 0 and summary["estimated_output_counts"] == 0
    assert summary["input_tokens"] == sum(lengths)
    assert summary["output_tokens"] == workload.total_output_tokens


def test_without_usage_output_tokens_are_choice_chunks_and_text_prompts_unknown(rng):
    """A chunk whose text is empty still carries a token (shardline serve and vLLM send one
    per step that makes tokens, a partial multi-byte character among them): it counted
    none."""
    texts = [random_text(rng, 1, 3) if rng.random() < 0.7 else "" for _ in range(12)]
    chunks = "".join(f'data: {{"choices": [{{"index": 0, "text": "{t}"}}]}}\n\n'
                     for t in texts)
    body = (chunks + 'data: {"choices": []}\n\ndata: [DONE]\n\n').encode()

    async def go(prompts):
        transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
        async with httpx.AsyncClient(transport=transport) as client:
            target = ServerTarget("http://bench.test", MODEL, client, TIMEOUT)
            workload = Workload(prompts, [len(texts)] * len(prompts))
            return (await run_online(target, workload, float("inf"))).summary()

    summary = asyncio.run(go(["some text", [9, 10, 11]]))
    assert summary["output_tokens"] == 2 * len(texts)
    assert summary["estimated_output_counts"] == 2
    assert summary["input_tokens"] is None and summary["input_tokens_per_s"] is None
    ids_only = asyncio.run(go([[9, 10, 11], [12]]))
    assert ids_only["input_tokens"] == 4


def test_the_first_token_is_the_first_chunk_with_a_choice_even_without_text(rng):
    """A first token that completes no text comes in a chunk of empty text; time to first
    token waited for the next chunk with text."""
    gap = rng.uniform(0.5, 1.0)

    async def stream():
        yield b'data: {"choices": [{"index": 0, "text": ""}]}\n\n'
        await asyncio.sleep(gap)
        yield b'data: {"choices": [{"index": 0, "text": "\xc3\xa9"}]}\n\ndata: [DONE]\n\n'

    async def go():
        transport = httpx.MockTransport(lambda request: httpx.Response(200, content=stream()))
        async with httpx.AsyncClient(transport=transport) as client:
            target = ServerTarget("http://bench.test", MODEL, client, TIMEOUT)
            return await run_online(target, Workload([[9, 10]], [2]), float("inf"))
    [record] = asyncio.run(go()).records
    assert record.error is None and record.output_tokens == 2
    assert record.first_token - record.arrival < gap <= record.done - record.arrival


class SilentServer:
    """A local HTTP server that accepts every connection, reads the request and then
    sends nothing more than `reply` (bytes, maybe empty), keeping the connection open
    until closed: a server that hung."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = []
        self.accepted_at = []
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.closing.is_set():
            try:
                connection, _ = self.listener.accept()
            except socket.timeout:
                continue
            self.connections.append(connection)
            self.accepted_at.append(time.monotonic())
            connection.settimeout(TIMEOUT)
            connection.recv(65536)
            connection.sendall(self.reply)

    def close(self) -> None:
        self.closing.set()
        self.thread.join(TIMEOUT)
        for connection in [*self.connections, self.listener]:
            connection.close()
        assert not self.thread.is_alive()


FIRST_CHUNK = b'data: {"choices": [{"index": 0, "text": "a"}]}\n\n'


def run_timing_out(rng, url: str, timeout: float) -> tuple[dict, int]:
    """A random online run of 1 to 3 requests against `url`: (summary, request count)."""
    count = rng.randint(1, 3)

    async def go():
        async with httpx.AsyncClient() as client:
            target = ServerTarget(url, MODEL, client, timeout)
            workload = Workload([ids(rng, rng.randint(2, 6)) for _ in range(count)],
                                [rng.randint(2, 5) for _ in range(count)])
            return await asyncio.wait_for(run_online(target, workload, float("inf")),
                                          TIMEOUT)
    return asyncio.run(go()).summary(), count


def assert_all_timed_out(summary: dict, count: int, url: str, timeout: float,
                         waiting: str) -> None:
    assert summary["failed_requests"] == count and summary["finished_requests"] == 0
    assert summary["errors"] == [{
        "error": f"TimeoutError: {url}/v1/completions timed out after {timeout:g} s {waiting}",
        "requests": count}]
    assert timeout <= summary["elapsed_s"] < TIMEOUT


@pytest.mark.parametrize("reply", [
    b"",
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    + b"%x\r\n%s\r\n" % (len(FIRST_CHUNK), FIRST_CHUNK),
], ids=["no-answer", "hung-mid-stream"])
def test_a_server_that_hangs_fails_its_requests_after_the_timeout(reply, rng):
    """The harness's client had no timeout: a server that accepted a request and never
    answered (or stopped between chunks) hung the run until Ctrl-C."""
    server = SilentServer(reply)
    # Long enough that a busy 2-core machine still connects in time: the error then
    # names the read, which is the wait under test.
    timeout = round(rng.uniform(1.0, 2.0), 2)
    try:
        summary, count = run_timing_out(rng, server.url, timeout)
    finally:
        server.close()
    assert_all_timed_out(summary, count, server.url, timeout,
                         "waiting for the server's next data")


def test_a_server_that_never_accepts_fails_its_requests_on_the_connect_timeout(rng):
    """A listener whose accept queue is full: Linux drops further connection attempts, so
    connecting hangs, and the timeout names the connect."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    queued = [socket.socket() for _ in range(4)]
    for sock in queued:
        sock.setblocking(False)
        sock.connect_ex(address)
    url = f"http://127.0.0.1:{address[1]}"
    timeout = round(rng.uniform(0.2, 0.5), 2)
    try:
        summary, count = run_timing_out(rng, url, timeout)
    finally:
        for sock in [*queued, listener]:
            sock.close()
    assert_all_timed_out(summary, count, url, timeout, "connecting")


def test_bench_request_timeout_reaches_the_server_target(tmp_path, rng, capsys):
    """`shardline bench --url ... --request-timeout S` against a server that never answers
    ends with every request failed on the timeout (exit 1, nothing recorded)."""
    from shardline.cli import main

    server = SilentServer(b"")
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text('{"prompt": [5, 6, 7], "max_tokens": 2}\n')
    timeout = rng.choice(["0.2", "0.35", "0.5"])
    out = tmp_path / "runs.jsonl"
    try:
        status = main(["bench", "--mode", "online", "--url", server.url, "-m", MODEL,
                       "--dataset", str(dataset), "--request-timeout", timeout,
                       "--no-progress", "--out", str(out)])
    finally:
        server.close()
    assert status == 1 and not out.exists()
    assert f"/v1/completions timed out after {float(timeout):g} s" in capsys.readouterr().err


def test_bench_sends_more_than_a_hundred_requests_at_once(tmp_path, rng):
    """httpx caps a client at 100 connections by default: the bench's requests past the
    hundredth, sent all at once, waited inside the client (their wait counted as server
    latency) and reached the server only after earlier ones ended."""
    from shardline.cli import main

    server = SilentServer(b"")
    count = rng.randint(105, 130)
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("".join(
        json.dumps({"prompt": ids(rng, rng.randint(2, 6)), "max_tokens": 2}) + "\n"
        for _ in range(count)))
    try:
        status = main(["bench", "--mode", "online", "--url", server.url, "-m", MODEL,
                       "--dataset", str(dataset), "--request-timeout", "1",
                       "--request-rate", "inf",
                       "--no-progress", "--out", str(tmp_path / "runs.jsonl")])
    finally:
        server.close()
    assert status == 1 and len(server.accepted_at) == count
    spread = max(server.accepted_at) - min(server.accepted_at)
    assert spread < 1, f"a request waited {spread:.2f} s for a connection"
