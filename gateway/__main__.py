"""`python -m gateway [--sandbox]`: serve the gateway with uvicorn.

Once it listens, the log names its address once (GATEWAY_PUBLIC_URL when set) and one next
step: a curl line that works against it as printed. That line replaces uvicorn's own
"Uvicorn running on ..." line, which names the same address."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import shutil
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import uvicorn
from pydantic import ValidationError
from uvicorn.supervisors import Multiprocess

from gateway.api.landing import curl_example
from gateway.app import create_app
from gateway.config import ConfigError
from gateway.metrics import (
    MULTIPROC_ENV,
    MetricsDirError,
    bury,
    multiprocess_dir,
    prepare_multiprocess_dir,
)
from gateway.settings import Settings, settings_error

# In-flight upscales get this long to finish after SIGTERM (compose's stop_grace_period and
# Kubernetes' terminationGracePeriodSeconds must be longer).
DRAIN_S = 30
STARTUP_FAILURE = 3  # uvicorn's exit status when the app or the socket cannot start
REFUSED = 2  # invalid settings or config, or production incomplete: nothing was started

log = logging.getLogger("gateway")
Announce = Callable[[str, str, int], None]


def announcer(settings: Settings, workers: int = 1) -> Announce:
    """What to log once the gateway listens on (scheme, host, port)."""
    config = settings.load_config()
    keyed = bool(settings.client_keys() or config.clients.keys)

    def announce(scheme: str, host: str, port: int) -> None:
        shown = f"[{host}]" if ":" in host else host
        if settings.public_url:
            url = settings.public_url.rstrip("/")
            where = f"{url}, bound to {shown}:{port},"
        else:
            wildcard = host in ("0.0.0.0", "::", "")
            # A wildcard address is no place to send a request to; this host answers there.
            url = f"{scheme}://{'localhost' if wildcard else shown}:{port}"
            where = f"{url}{' (all interfaces)' if wildcard else ''}"
        # The supervisor binds the socket before its workers start: connections wait there.
        many = f" with {workers} workers starting" if workers > 1 else ""
        log.info(
            "upscale-gateway listening on %s%s (docs: /docs, playground: /playground)",
            where,
            many,
        )
        note = "source.png: any PNG, JPEG or WebP" + ("; KEY: a client key" if keyed else "")
        log.info("try it: %s   # %s", curl_example(url, config.model.id, keyed), note)

    return announce


class _Server(uvicorn.Server):
    """uvicorn's server, announcing the gateway where uvicorn logs its own line: after the
    app started and the socket is bound, so the port is the real one (also for port 0)."""

    def __init__(self, config: uvicorn.Config, announce: Announce):
        super().__init__(config)
        self._announce = announce

    def _log_started_message(self, listeners: Sequence[socket.SocketType]) -> None:
        host, port = listeners[0].getsockname()[:2]
        self._announce("https" if self.config.ssl else "http", str(host), int(port))


class _Announcing(logging.Filter):
    """With workers, the supervisor binds the socket and uvicorn logs the address there, once
    (the workers only inherit the socket); this puts the gateway's announcement in its place.
    Only the supervisor has it: no emulator runs in that process to log a lookalike line."""

    def __init__(self, announce: Announce):
        super().__init__()
        self._announce = announce

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not (str(record.msg).startswith("Uvicorn running on ") and isinstance(args, tuple)):
            return True
        if len(args) == 3:  # (scheme, host, port); unix sockets and fds are not announced
            self._announce(str(args[0]), str(args[1]), int(args[2]))
        return False


def _refuse(message: str) -> NoReturn:
    # One line on stderr, before logging is configured (its level is one of the settings):
    # what an operator reads in `docker logs`, with nothing to scroll past.
    print(f"upscale-gateway: {message}", file=sys.stderr, flush=True)
    sys.exit(REFUSED)


def _checked_settings() -> Settings:
    """The settings and the config, valid, and complete for production; else exit 2."""
    try:
        settings = Settings()
        config = settings.load_config()
    except ValidationError as exc:
        _refuse(settings_error(exc))
    except ConfigError as exc:
        _refuse(str(exc))
    refusals = settings.production_refusals(config)
    if refusals:
        _refuse("GATEWAY_ENV=production refuses to start: " + "; ".join(refusals))
    return settings


class _Supervisor(Multiprocess):
    """uvicorn's supervisor (which replaces a worker that dies), telling prometheus_client
    which workers are gone, however they went: their live gauges leave the scrape."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], metrics: Path):
        super().__init__(config, sockets)
        self._metrics = metrics

    def _pids(self) -> set[int]:
        return {p.pid for p in self.processes if p.pid is not None}

    def keep_subprocess_alive(self) -> None:  # a dead or hung worker is replaced here
        before = self._pids()
        super().keep_subprocess_alive()
        bury(before - self._pids(), self._metrics)

    def handle_signals(self) -> None:  # SIGHUP replaces every worker, SIGTTOU retires one
        before = self._pids()
        super().handle_signals()
        bury(before - self._pids(), self._metrics)


def _supervise(config: uvicorn.Config, metrics: Path) -> None:
    """What uvicorn.run does with workers (bind in this process, then supervise), with the
    supervisor above."""
    sock = config.bind_socket()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            _Supervisor(config, [sock], metrics).run()
    finally:
        sock.close()


def _metrics_dir() -> tuple[Path, bool]:
    try:
        return prepare_multiprocess_dir(multiprocess_dir())
    except MetricsDirError as exc:
        _refuse(str(exc))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    parser.add_argument(
        "--sandbox",
        action="store_true",
        help="route to in-process emulated providers (nothing is billed)",
    )
    parser.add_argument("--host", help="listen address (GATEWAY_HOST)")
    parser.add_argument("--port", type=int, help="listen port (GATEWAY_PORT)")
    parser.add_argument("--config", help="YAML config path (GATEWAY_CONFIG)")
    args = parser.parse_args(argv)
    if args.sandbox:
        os.environ["GATEWAY_SANDBOX"] = "true"
    if args.config:
        os.environ["GATEWAY_CONFIG"] = args.config
    settings = _checked_settings()
    settings.configure_logging()
    options: dict[str, Any] = {
        "host": args.host or settings.host,
        "port": settings.port if args.port is None else args.port,
        "log_level": settings.log_level,
        "access_log": False,  # gateway.access logs one structured line per request
        "proxy_headers": True,
        "timeout_graceful_shutdown": DRAIN_S,
        # Longer than load balancers' idle timeouts (60 s is common), so the balancer, not
        # the gateway, closes an idle connection: no request lands on a socket being closed.
        "timeout_keep_alive": 75,
        # Connection cap, header deadline and size, write deadline (gateway/edge.py); a
        # string, so that each worker process imports it.
        "http": "gateway.edge:EdgeProtocol",
    }
    announce = announcer(settings, settings.workers)
    if settings.workers == 1:
        if multiprocess_dir():
            # The operator named a directory, and prometheus_client saw it on import: this
            # one process keeps its values in files there, so they start from zero too.
            _metrics_dir()
        server = _Server(uvicorn.Config(create_app(settings), **options), announce)
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C: uvicorn has drained by now
            server.run()
        if not server.started:
            sys.exit(STARTUP_FAILURE)
        return
    # Worker processes share one socket; each builds its own app from the environment.
    if not settings.signing_key:
        # A URL signed by one worker must verify in the others.
        os.environ["GATEWAY_SIGNING_KEY"] = secrets.token_urlsafe(32)
    if not settings.redis_url:
        log.warning(
            "GATEWAY_WORKERS=%d without REDIS_URL: each worker keeps its own routing state "
            "and idempotency keys",
            settings.workers,
        )
    logging.getLogger("uvicorn.error").addFilter(_Announcing(announce))
    path, derived = _metrics_dir()
    # Inherited by every worker, which imports prometheus_client after this: values in files.
    os.environ[MULTIPROC_ENV] = str(path)
    config = uvicorn.Config(
        "gateway.app:create_app", factory=True, workers=settings.workers, **options
    )
    try:
        _supervise(config, path)
    finally:
        if derived:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
