"""What a drill runs against: both provider emulators, a Redis of its own, gateway replicas
sharing them (and one results directory, as behind a load balancer), and a client-side
balancer that spreads requests over the live replicas."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from adapters.emulators import (
    BackgroundServer,
    EmulatorConfig,
    FaultScript,
    create_fal_app,
    create_replicate_app,
)
from tests.integration.conftest import FAL_KEY, QUIET, REPLICATE_TOKEN, Emulator, write_config
from tests.integration.redis_server import RedisServer
from tests.integration.servers import GatewayProcess

CLIENT_KEY = "sk-drill-2f7c0d9a"
ADMIN_KEY = "admin-drill-81b4"
IDEMPOTENT = frozenset({"GET", "HEAD"})


class Balancer(httpx.BaseTransport):
    """Round robin over the replicas, like a load balancer with passive health checks: a
    replica that refuses a connection is skipped for a while and the request goes to the
    next one (safe: nothing was sent). A connection that breaks before the answer's headers
    is passed to the next replica for an idempotent method (GET, HEAD), as nginx's default
    `proxy_next_upstream error timeout` does; for a POST it is the client's to retry, as
    behind a real balancer (nginx never passes a non-idempotent request on)."""

    def __init__(self, ports: list[int], dead_for_s: float = 5.0):
        self.ports = ports
        self._next = itertools.count()
        self._dead: dict[int, float] = {}
        self._dead_for_s = dead_for_s
        self._lock = threading.Lock()
        self._inner = httpx.HTTPTransport(limits=httpx.Limits(max_connections=200))

    def _pick(self) -> list[int]:
        with self._lock:
            start = next(self._next)
        now = time.monotonic()
        order = [self.ports[(start + i) % len(self.ports)] for i in range(len(self.ports))]
        live = [p for p in order if self._dead.get(p, 0) <= now]
        return live or order

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        error: Exception | None = None
        for port in self._pick():
            request.url = request.url.copy_with(port=port)
            try:
                return self._inner.handle_request(request)
            except httpx.ConnectError as exc:
                with self._lock:
                    self._dead[port] = time.monotonic() + self._dead_for_s
                error = exc
            except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
                if request.method not in IDEMPOTENT:
                    raise
                with self._lock:
                    self._dead[port] = time.monotonic() + self._dead_for_s
                error = exc
        assert error is not None
        raise error

    def close(self) -> None:
        self._inner.close()


class Stack:
    def __init__(self, workdir: Path, replicas: int = 3, **config: dict[str, Any]):
        self.workdir = workdir
        self.replicas_wanted = replicas
        self.killed_at: float | None = None  # when a drill last SIGKILLed a replica (time.time)
        self.config = config
        self.fal: Emulator
        self.replicate: Emulator
        self.redis: RedisServer
        self.replicas: list[GatewayProcess] = []
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Stack:
        for name, factory, key in (
            ("fal", create_fal_app, FAL_KEY),
            ("replicate", create_replicate_app, REPLICATE_TOKEN),
        ):
            app = factory(EmulatorConfig(api_key=key, faults=FaultScript(**QUIET)))
            server = self._stack.enter_context(BackgroundServer(app))
            setattr(self, name, Emulator(server))
        self.redis = RedisServer(self.workdir).start()
        self._stack.callback(lambda: self.redis.stop())
        path = write_config(
            self.workdir / "gateway.yaml",
            **{
                "limits": {"request_timeout_s": 20},
                "providers": {"fal": {"attempt_timeout_s": 2}},
                "routing": {"breaker": {"failure_threshold": 3, "open_base_s": 2}},
                **self.config,
            },
        )
        for _ in range(self.replicas_wanted):
            self.replicas.append(self.start_replica(path))
        return self

    def start_replica(self, config: Path | None = None) -> GatewayProcess:
        process = GatewayProcess(
            {
                "FAL_KEY": FAL_KEY,
                "REPLICATE_API_TOKEN": REPLICATE_TOKEN,
                "GATEWAY_FAL_URL": self.fal.url,
                "GATEWAY_REPLICATE_URL": self.replicate.url,
                "GATEWAY_CONFIG": str(config or self.workdir / "gateway.yaml"),
                "REDIS_URL": self.redis.url,
                "GATEWAY_API_KEYS": CLIENT_KEY,
                "GATEWAY_ADMIN_KEY": ADMIN_KEY,
                "GATEWAY_RESULTS_DIR": str(self.workdir / "results"),
            },
            self.workdir,
        ).start()
        self._stack.callback(process.stop)
        return process

    def balancer(self) -> Balancer:
        return Balancer([r.port for r in self.replicas])

    def jobs(self) -> list[dict[str, Any]]:
        """Both emulators' jobs, each with the name of the provider it ran at."""
        out: list[dict[str, Any]] = []
        for provider, emulator in (("fal", self.fal), ("replicate", self.replicate)):
            response = httpx.get(f"{emulator.url}/_emulator/jobs", timeout=10)
            out += [{**job, "provider": provider} for job in response.json()["jobs"]]
        return out

    def replace_dead(self) -> None:
        """A drill that killed a replica leaves the next one a full set."""
        for n, replica in enumerate(self.replicas):
            if replica.proc is None or replica.proc.poll() is not None:
                self.replicas[n] = self.start_replica()

    def reset_breakers(self) -> None:
        """Each drill starts from closed circuits (the last drill's faults opened some)."""
        live = next(r for r in self.replicas if r.proc is not None and r.proc.poll() is None)
        for name in ("fal", "replicate"):
            httpx.post(
                f"{live.url}/admin/providers/{name}/reset",
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                timeout=10,
            ).raise_for_status()
        time.sleep(1.1)  # every replica's one-second view of the records expires

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


@contextlib.contextmanager
def stack(workdir: Path, replicas: int = 3, **config: dict[str, Any]) -> Iterator[Stack]:
    with Stack(workdir, replicas, **config) as running:
        yield running
