"""Sandbox mode: the providers' emulators started in-process on free loopback ports, so the
gateway serves real upscales with no credentials and nothing is billed.

The emulators are plain uvicorn servers sharing the gateway's uvicorn loggers; their
startup, shutdown and connection lines are kept out of the log (warnings and errors still
show), so a user reads the gateway's own address there, not three. /readyz names the
emulators' URLs.

The emulators listen on loopback ports that anyone on the host can reach, so they take one
key, drawn per process and held by the gateway alone: it is the providers' credential and
the key of their /_emulator/* routes (fault script, request log, jobs). GATEWAY_SANDBOX_KEY,
when set, is that key instead, for a test that reads the emulators' jobs itself."""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import logging
import os
import secrets
from dataclasses import dataclass, field
from typing import Any

from adapters.registry import ADAPTERS
from gateway.config import GatewayConfig

log = logging.getLogger("gateway.sandbox")
SANDBOX_JOBS = 256  # finished jobs (and result files) each sandbox emulator keeps
SANDBOX_KEY_ENV = "GATEWAY_SANDBOX_KEY"
# Drawn on import, so each process (each worker starts its own sandbox) has its own; read
# from the environment here, not Settings, because app.py takes it as a constant.
SANDBOX_KEY = os.environ.get(SANDBOX_KEY_ENV) or secrets.token_urlsafe(32)
# uvicorn logs through these module-level loggers whichever server is speaking.
_UVICORN_LOGGERS = ("uvicorn.error", "uvicorn.access", "uvicorn")

BANNER = (
    "\n" + "!" * 78 + "\n"
    "!!  SANDBOX MODE: providers are EMULATED in-process. Images are upscaled locally by\n"
    "!!  a plain resampler; nothing reaches fal.ai or Replicate and nothing is billed.\n"
    "!!  Set FAL_KEY and/or REPLICATE_API_TOKEN (and drop --sandbox) to go live.\n" + "!" * 78
)

# True in the tasks of an emulator's server: asyncio copies the context into every task and
# callback created from it (its lifespan, accept loop, connections), so a record's origin
# is known without parsing messages, which the gateway's own server writes alike.
_IN_EMULATOR: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "gateway_in_emulator", default=False
)


class _EmulatorChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not _IN_EMULATOR.get()


@dataclass(slots=True)
class Sandbox:
    urls: dict[str, str] = field(default_factory=dict)
    key: str = SANDBOX_KEY  # the emulators' provider key and admin key
    _servers: list[tuple[Any, asyncio.Task[Any]]] = field(default_factory=list)
    _quiet: _EmulatorChatter = field(default_factory=_EmulatorChatter)

    def _silence(self) -> None:
        for name in _UVICORN_LOGGERS:
            logging.getLogger(name).addFilter(self._quiet)

    async def stop(self) -> None:
        for server, _ in self._servers:
            server.should_exit = True
        await asyncio.gather(*(task for _, task in self._servers), return_exceptions=True)
        # Removed only once their shutdown lines are written (and dropped).
        for name in _UVICORN_LOGGERS:
            logging.getLogger(name).removeFilter(self._quiet)


async def start_sandbox(config: GatewayConfig) -> Sandbox:
    emulators = importlib.import_module("adapters.emulators")
    sandbox = Sandbox()
    sandbox._silence()
    for name, provider in config.providers.items():
        kind = ADAPTERS[provider.adapter]
        factory = getattr(emulators, kind.emulator)
        emu_config = emulators.EmulatorConfig(
            api_key=sandbox.key,
            admin_key=sandbox.key,
            # The emulators run in the gateway's process and keep each job's output: a long
            # sandbox session (a 1,000-line batch) must not grow the gateway by all of them.
            max_jobs=SANDBOX_JOBS,
            faults=emulators.FaultScript(
                latency_ms=config.sandbox.latency_ms, jitter_ms=config.sandbox.jitter_ms
            ),
        )
        # Set only while serve_in_loop creates the server's task, which keeps a copy.
        token = _IN_EMULATOR.set(True)
        try:
            server, task, url = await emulators.serve_in_loop(factory(emu_config))
        finally:
            _IN_EMULATOR.reset(token)
        sandbox._servers.append((server, task))
        sandbox.urls[name] = url
        log.debug("sandbox: %s emulated at %s", name, url)
    log.warning(BANNER)
    return sandbox
