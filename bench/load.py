"""The benchmark's load: the ways a client gets the upscaled bytes (straight from the fal
queue protocol, or through the gateway), and a closed loop of clients driving one of them
while a cell records what it saw."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.hedging import quantile
from bench.processes import Service, spawn
from gateway.transport import ProviderTransport
from tests.integration.servers import ROOT

KEY = "bench-key"
MODEL_PATH = "fal-ai/recraft/upscale/crisp"
NATIVE = 4
CONFIG = yaml.safe_load((ROOT / "config/gateway.yaml").read_text())
POLL = CONFIG["providers"]["fal"]


def gateway_env(
    tmp: Path,
    fal_url: str,
    workers: int,
    redis: str | None,
    limits: dict[str, Any] | None = None,
) -> dict[str, str]:
    """The benchmark gateway's settings: fal only, no exploring, no result cache, and
    `limits` over the shipped config's."""
    config = {
        **CONFIG,
        "routing": {**CONFIG["routing"], "explore_share": 0},
        # The same image is sent again and again: with the result cache on, the gateway
        # would be measured serving hits, not the provider path the targets are about.
        "cache": {"enabled": False},
        "limits": {**CONFIG["limits"], **(limits or {})},
    }
    path = tmp / f"gateway-{workers}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        "BENCH_TMP": str(tmp),
        "FAL_KEY": KEY,
        "GATEWAY_FAL_URL": fal_url,
        "GATEWAY_CONFIG": str(path),
        "GATEWAY_RESULTS_DIR": str(tmp / f"results-{workers}"),
        "GATEWAY_SIGNING_KEY": "bench-signing-key-0123456789abcdef",
        "GATEWAY_WORKERS": str(workers),
        "GATEWAY_LOG_LEVEL": "info",  # the access line per request is part of the real path
    }
    if redis:
        env["REDIS_URL"] = redis
    return env


def fal_emulator(
    tmp: Path, faults: str, native: float = NATIVE, cpus: set[int] | None = None
) -> AbstractContextManager[Service]:
    """The fal emulator the benchmarks measure against, on a free port, with `faults` (JSON)."""
    return spawn(
        "emulator",
        ["-m", "adapters.emulators", "fal", "--port", "{port}", "--key", KEY,
         "--native-factor", f"{native:g}", "--faults", faults],
        "/_emulator/faults",
        {"BENCH_TMP": str(tmp)},
        cpus,
    )  # fmt: skip


def direct_flow(base: str) -> Callable[[httpx.AsyncClient, bytes], Awaitable[bytes]]:
    auth = {"Authorization": f"Key {KEY}"}

    async def run(client: httpx.AsyncClient, png: bytes) -> bytes:
        uri = "data:image/png;base64," + base64.b64encode(png).decode()
        submitted = await client.post(f"{base}/{MODEL_PATH}", json={"image_url": uri}, headers=auth)
        submitted.raise_for_status()
        queue = submitted.json()
        delay = POLL["poll_initial_s"]  # the gateway's own polling schedule
        while True:
            status = await client.get(queue["status_url"], headers=auth)
            if status.json()["status"] == "COMPLETED":
                break
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, POLL["poll_max_s"])
        result = await client.get(queue["response_url"], headers=auth)
        result.raise_for_status()
        image = await client.get(result.json()["image"]["url"])
        image.raise_for_status()
        return image.content

    return run


def gateway_flow(
    base: str, response_format: str, scale_factor: float | None = NATIVE
) -> Callable[[httpx.AsyncClient, bytes], Awaitable[bytes]]:
    """`scale_factor`: None asks for the model's native output (no size fields at all)."""
    fields = {"model": "recraft-crisp-upscale", "response_format": response_format}
    if scale_factor is not None:
        fields["scale_factor"] = f"{scale_factor:g}"

    async def run(client: httpx.AsyncClient, png: bytes) -> bytes:
        answer = await client.post(
            f"{base}/v1/images/edits",
            files={"image": ("image.png", png, "image/png")},
            data=fields,
        )
        answer.raise_for_status()
        item = answer.json()["data"][0]
        if response_format == "b64_json":
            return base64.b64decode(item["b64_json"])
        image = await client.get(item["url"])
        image.raise_for_status()
        return image.content

    return run


@dataclass
class Cell:
    variant: str
    side: int
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    failures: int = 0
    peak_kib: int = 0  # of the service behind the variant
    rss_start_kib: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)

    def fail(self, exc: Exception) -> None:
        self.failures += 1
        if self.failures == 1:
            detail = exc.response.text[:300] if isinstance(exc, httpx.HTTPStatusError) else ""
            print(f"  {self.variant} {self.side} c{self.concurrency}: {exc!r} {detail}")

    def quantile(self, q: float) -> float:
        return quantile(self.latencies, q) if self.latencies else float("nan")

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0


async def drive(
    flow: Callable[[httpx.AsyncClient, bytes], Awaitable[bytes]],
    png: bytes,
    expect_bytes: int,
    concurrency: int,
    seconds: float,
    cell: Cell,
    warmed: Callable[[], None] = lambda: None,
) -> None:
    """A closed loop: `concurrency` clients, each sending its next request on an answer."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    # The gateway's own provider transport (aiohttp under httpx): the cheaper the load
    # generator, the more of the shared cores go to what is measured.
    transport = ProviderTransport(limits=limits)
    async with httpx.AsyncClient(timeout=120, limits=limits, transport=transport) as client:

        async def attempt() -> bool:
            try:
                data = await flow(client, png)
            except httpx.HTTPError as exc:
                cell.fail(exc)
                return False
            if len(data) != expect_bytes:  # not the provider's bytes: the measurement is void
                cell.fail(ValueError(f"{len(data)} bytes, not {expect_bytes}"))
                return False
            return True

        await asyncio.gather(*(attempt() for _ in range(min(concurrency, 4))))  # warm-up
        warmed()
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < stop:
                started = time.perf_counter()
                if await attempt():
                    cell.latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cell.seconds += time.perf_counter() - began
