"""Sandbox mode: the providers' emulators started in-process on free loopback ports, so the
gateway serves real upscales with no credentials and nothing is billed."""

from __future__ import annotations

import asyncio
import importlib
import logging
from dataclasses import dataclass, field
from typing import Any

from adapters.registry import ADAPTERS
from gateway.config import GatewayConfig

log = logging.getLogger("gateway.sandbox")
SANDBOX_KEY = "sandbox-key"

BANNER = (
    "\n" + "!" * 78 + "\n"
    "!!  SANDBOX MODE: providers are EMULATED in-process. Images are upscaled locally by\n"
    "!!  a plain resampler; nothing reaches fal.ai or Replicate and nothing is billed.\n"
    "!!  Set FAL_KEY and/or REPLICATE_API_TOKEN (and drop --sandbox) to go live.\n" + "!" * 78
)


@dataclass(slots=True)
class Sandbox:
    urls: dict[str, str] = field(default_factory=dict)
    _servers: list[tuple[Any, asyncio.Task[Any]]] = field(default_factory=list)

    async def stop(self) -> None:
        for server, _ in self._servers:
            server.should_exit = True
        await asyncio.gather(*(task for _, task in self._servers), return_exceptions=True)


async def start_sandbox(config: GatewayConfig) -> Sandbox:
    emulators = importlib.import_module("adapters.emulators")
    sandbox = Sandbox()
    for name, provider in config.providers.items():
        kind = ADAPTERS[provider.adapter]
        factory = getattr(emulators, kind.emulator)
        emu_config = emulators.EmulatorConfig(
            api_key=SANDBOX_KEY,
            faults=emulators.FaultScript(
                latency_ms=config.sandbox.latency_ms, jitter_ms=config.sandbox.jitter_ms
            ),
        )
        server, task, url = await emulators.serve_in_loop(factory(emu_config))
        sandbox._servers.append((server, task))
        sandbox.urls[name] = url
        log.warning("sandbox: %s emulated at %s", name, url)
    log.warning(BANNER)
    return sandbox
