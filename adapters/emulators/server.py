"""Running an emulator on a real loopback socket: in a background thread (tests,
benchmarks) or as a task in the current event loop (the gateway's sandbox mode).

Plain http by default (the gateway must work against http:// provider URLs); TLS only when
given a certificate, for official clients that speak https only (fal-client)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn
from starlette.types import ASGIApp

# Providers' front ends keep idle connections about a minute; uvicorn's 5 s default would
# race clients' pools (a request written onto a connection the server is closing).
KEEP_ALIVE_S = 75


def _server(
    app: ASGIApp,
    host: str,
    port: int,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        # Leave logging alone: in sandbox mode the gateway's own uvicorn shares these
        # loggers, and configuring them here would silence its startup lines.
        log_config=None,
        log_level=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=2,
        timeout_keep_alive=KEEP_ALIVE_S,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
    )
    server = uvicorn.Server(config)
    # The host process owns SIGTERM/SIGINT: an in-loop emulator that captured them would
    # stop first and fail the gateway's in-flight requests during its graceful drain.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    return server


def _bound_url(server: uvicorn.Server) -> str:
    sock = server.servers[0].sockets[0]
    host, port = sock.getsockname()[:2]
    return f"{'https' if server.config.is_ssl else 'http'}://{host}:{port}"


async def serve_in_loop(
    app: ASGIApp, host: str = "127.0.0.1", port: int = 0
) -> tuple[uvicorn.Server, asyncio.Task[Any], str]:
    server = _server(app, host, port)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()  # re-raise why it could not start
            raise RuntimeError("emulator stopped before starting")
        await asyncio.sleep(0.01)
    return server, task, _bound_url(server)


class BackgroundServer:
    """`with BackgroundServer(app) as server: server.url` — a thread with its own loop.
    With `ssl_certfile` (a PEM holding the certificate chain, and the key unless `ssl_keyfile`
    names it) it serves https and `url` says so."""

    def __init__(
        self,
        app: ASGIApp,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
    ):
        self._server = _server(app, host, port, ssl_certfile, ssl_keyfile)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self.url = ""

    def start(self, timeout: float = 10.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("emulator did not start")
            time.sleep(0.01)
        self.url = _bound_url(self._server)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
