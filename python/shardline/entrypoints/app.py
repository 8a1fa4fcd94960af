"""The HTTP app: OpenAI's completions, chat completions and models endpoints, /health and
/metrics, over one AsyncLLM (FastAPI, served by uvicorn; `pip install shardline[serve]`).

A bad request gets a 400 in OpenAI's error format with the field named in `param`, and
touches no engine state; an unknown path or method is a 404 or 405 in the same format.
The body is read by pydantic's JSON parser (see json_body), which refuses what Python's
would pass on to fail deeper as a 500: a lone UTF-16 surrogate escape ("\\ud800", not
text any tokenizer takes), named with its field, and nesting deep enough to exhaust the
recursion limit.

A request's body is decoded and checked, and its prompts rendered and tokenized, in a
worker thread, so that a large one does not hold up the streams of others (3000 prompts
of 440 characters stalled every other response for 0.76 s; a 30 MB chat body with a lone
surrogate escape at its end, whose diagnosis reads every string before it, for 7.2 s).

A body over MAX_BODY_BYTES gets a 413 before more of it is read: the server holds whole
bodies in memory, and any prompt a model takes fits in far less. The 413 closes the
connection when the client has sent its body or left, REFUSED_BODY_LINGER seconds after
it at the latest: kept open, the connection went on reading and dropping the rest of the
body for as long as the client sent it (a declared 1 GiB whole). It is not closed at
once, since a client that writes the whole body before reading (httpx, and so the openai
client) would then get a reset instead of the 413 (AsyncOpenAI, sending 40 MiB, got
APIConnectionError each time).

A client that disconnects aborts its requests: a streaming response closes its stream
however it ends, and a whole response races the generation against the connection's
disconnect message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
from typing import Any, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from shardline.engine.async_llm import AsyncLLM
from shardline.entrypoints import prometheus
from shardline.entrypoints.chat_protocol import ChatCompletionRequest
from shardline.entrypoints.json_body import decode_body
from shardline.entrypoints.protocol import (CompletionRequest, RequestError,
                                            engine_failure_message, error_body, parse)
from shardline.entrypoints.serving import (Decode, Generation, chat_generation,
                                           chat_response, completion_generation,
                                           completion_response, error_event,
                                           stream_events)

logger = logging.getLogger("shardline")


MAX_BODY_BYTES = 32 * 1024 * 1024
REFUSED_BODY_LINGER = 2.0
SHUTTING_DOWN = "the server is shutting down: the request was cancelled before it finished"


def _shutting_down() -> JSONResponse:
    return JSONResponse(error_body(SHUTTING_DOWN, None, "server_error"), status_code=503)


class _EventStream(StreamingResponse):
    """Closes its event stream however the response ends (a client that disconnects
    included), so the requests behind it are aborted at once, not when it is collected.
    When the server's shutdown timeout cancels it, the stream ends with an error event
    (or, before its first byte, a 503) instead of a cut connection and a traceback."""

    media_type = "text/event-stream"

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        started = False

        async def send_tracked(message: dict) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await super().__call__(scope, receive, send_tracked)
        except asyncio.CancelledError:
            if not started:
                await _shutting_down()(scope, receive, send)
                return
            await send({"type": "http.response.body", "more_body": False,
                        "body": error_event(SHUTTING_DOWN).encode()})


class _BodyRefused(JSONResponse):
    """A 413 that closes its connection. Its body is sent at once, but the response ends
    (and uvicorn closes the connection, as its Connection header says) only once the
    client disconnects or its body ends, or REFUSED_BODY_LINGER seconds later: the body
    read meanwhile is dropped, so that a client still writing has time to read the 413
    before the close turns into a reset."""

    def __init__(self, content: Any, status_code: int, headers: dict | None = None) -> None:
        super().__init__(content, status_code, {**(headers or {}), "Connection": "close"})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": True})
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(_drop_body(receive), REFUSED_BODY_LINGER)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def build_app(llm: AsyncLLM, model_name: str) -> FastAPI:
    """The app serving `llm` under the model name `model_name` (what /v1/models lists and
    requests must name)."""
    app = FastAPI(title="shardline", description="OpenAI-compatible server over shardline")
    created = int(time.time())
    decode = Decode(llm.engine.tokenizer)

    @app.exception_handler(RequestError)
    async def bad_request(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), exc.param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        """An unknown path (404), method (405, with its Allow header) or a body too large
        (413, which ends the connection), in OpenAI's format."""
        message = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.headers and "Allow" in exc.headers:
            message += f"; this path allows {exc.headers['Allow']}"
        response = _BodyRefused if exc.status_code == 413 else JSONResponse
        return response(error_body(message, None), status_code=exc.status_code,
                        headers=exc.headers)

    @app.exception_handler(RuntimeError)
    async def engine_error(_: Request, exc: RuntimeError) -> JSONResponse:
        """The engine failed (a dead worker) or was shut down: /health says so as well."""
        return JSONResponse(error_body(engine_failure_message(exc), None, "server_error"),
                            status_code=500)

    @app.exception_handler(Exception)
    async def server_bug(_: Request, exc: Exception) -> JSONResponse:
        """Any other error is a defect here or in the engine: a 500 an OpenAI client can
        read (the traceback goes to the log)."""
        return JSONResponse(error_body(f"{type(exc).__name__}: {exc}", None, "server_error"),
                            status_code=500)

    async def body_of(request: Request, model: type) -> Any:
        body = await _read_body(request)
        parsed = await asyncio.to_thread(lambda: parse(model, decode_body(body)))
        if parsed.model != model_name:
            raise RequestError(f"model={parsed.model!r} is not served here; this server serves "
                               f"{model_name!r}", "model")
        return parsed

    async def respond(request: Request, body: Any, generation: Generation, chat: bool,
                      top_n: int) -> Response:
        if body.stream:
            # Once the 200 is sent an error can only be an event: a stopped engine is a 500.
            llm.check_health()
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return _EventStream(stream_events(generation, model_name, chat, decode, top_n,
                                              usage))
        try:
            outputs = await _unless_disconnected(request, generation.final())
        except asyncio.CancelledError:
            # The server stopped and its shutdown timeout ran out: the generation is
            # aborted, and the client learns why instead of getting a bare 500.
            return _shutting_down()
        if outputs is None:
            return Response(status_code=499)  # nobody is there to read it
        if chat:
            return JSONResponse(chat_response(generation, outputs, model_name, decode, top_n))
        return JSONResponse(completion_response(generation, outputs, model_name, decode))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await body_of(request, CompletionRequest)
        generation = await asyncio.to_thread(completion_generation, llm, body)
        return await respond(request, body, generation, False, 0)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await body_of(request, ChatCompletionRequest)
        generation = await asyncio.to_thread(chat_generation, llm, body)
        return await respond(request, body, generation, True, body.top_logprobs or 0)

    card = {"id": model_name, "object": "model", "created": created, "owned_by": "shardline",
            "max_model_len": llm.engine.max_model_len}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> JSONResponse:
        """OpenAI's model retrieval (`client.models.retrieve`): the card, or a 404."""
        if model != model_name:
            return JSONResponse(error_body(f"model {model!r} is not served here; this server "
                                           f"serves {model_name!r}", "model"), status_code=404)
        return JSONResponse(card)

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: load balancers' probes
    async def health() -> Response:
        """200 while the engine accepts requests; 503 once it failed or was shut down."""
        try:
            llm.check_health()
        except RuntimeError as exc:
            return JSONResponse({"status": "error", "message": engine_failure_message(exc)},
                                status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(prometheus.render(await llm.metrics()),
                        media_type=prometheus.CONTENT_TYPE)

    return app


async def _read_body(request: Request) -> bytes:
    """The request's body, refused with a 413 once it is known to exceed MAX_BODY_BYTES (by
    its Content-Length, or as its chunks arrive when it declares none)."""
    too_large = HTTPException(413, f"the body exceeds the server's limit of {MAX_BODY_BYTES} "
                                   f"bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _drop_body(receive: Any) -> None:
    """Read and drop the rest of a request's body, until it ends or the client leaves."""
    while (await receive()).get("more_body"):
        pass


async def _unless_disconnected(request: Request, work: Any) -> Any:
    """Await `work`, or cancel it (aborting its requests) and return None if the client
    disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        logger.info("client disconnected: its request was aborted")
        return None
    return task.result()


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the body was read already, so the next message the
    server has for this request is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def listen_sockets(host: str, port: int) -> list[socket.socket]:
    """TCP sockets bound to `host`:`port`, one per address the host resolves to (as uvicorn
    binds them: "localhost" may be 127.0.0.1 and ::1), for `run_server`. `shardline serve`
    binds them before the model loads, so that an address in use, a host this machine does
    not have and a name that does not resolve fail at once with the flag named, instead of
    after the load with uvicorn's log line and its exit status 3. ValueError for each. With
    port 0, every address gets the port the kernel picks for the first."""
    try:
        addresses = dict.fromkeys(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                     flags=socket.AI_PASSIVE))
    except socket.gaierror as exc:
        raise ValueError(f"--host {host!r} is neither an address nor a name this machine "
                         f"resolves ({exc.strerror})") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in addresses:
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            if family == socket.AF_INET6:   # so that :: leaves 0.0.0.0 to its own socket
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ValueError(f"--host {host} --port {port}: cannot listen there "
                         f"({exc.strerror}): choose another --port or --host") from None
    return sockets


def socket_url(sock: socket.socket) -> str:
    """The http URL of the address `sock` is bound to (an IPv6 host in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def run_server(llm: AsyncLLM, model_name: str, sockets: list[socket.socket],
               log_level: str = "info", shutdown_timeout: float = 10.0) -> None:
    """Serve `llm` on the bound `sockets` (see `listen_sockets`) until interrupted (Ctrl-C
    or SIGTERM), then shut the engine down. Requests still running then get
    `shutdown_timeout` seconds to finish before they are cancelled (and aborted in the
    engine), so that a stop never waits for a long generation."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            """uvicorn's startup, which names the addresses it listens on only when it
            binds the sockets itself: the line its users and scripts wait for."""
            await super().startup(sockets)
            if self.started:
                for sock in sockets or []:
                    logging.getLogger("uvicorn.error").info(
                        "Uvicorn running on %s (Press CTRL+C to quit)", socket_url(sock))

    host, port = sockets[0].getsockname()[:2]
    # uvicorn stops on SIGTERM as on Ctrl-C, then raises the signal again for the handler
    # it found; the default one killed the process before the engine shut down.
    try:
        with sigterm_as_interrupt():
            # No lifespan events: the app has none, and a second Ctrl-C while the engine
            # shut down cancelled uvicorn's lifespan task, which it logged as an error,
            # twice traced.
            config = uvicorn.Config(build_app(llm, model_name), host=host, port=port,
                                    log_level=log_level, lifespan="off",
                                    timeout_graceful_shutdown=shutdown_timeout)
            Server(config).run(sockets=sockets)
    except KeyboardInterrupt:
        pass
    finally:
        for sock in sockets:
            sock.close()
        llm.shutdown()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within it, SIGTERM raises KeyboardInterrupt in the main thread, so that it stops the
    engine as Ctrl-C does. Python's default SIGTERM kills the process at once, leaving the
    workers to notice their parent's death and their semaphores to the resource tracker.
    Elsewhere than the main thread (where signals cannot be handled) it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
