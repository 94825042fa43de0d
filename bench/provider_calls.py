"""CPU per provider call in the gateway's process: the status poll an upscale repeats
while its job runs, through the gateway's provider client against the same client as it
was, and against aiohttp alone (the floor under both), in one run.

    python -m bench.provider_calls                 # 5 rounds x 2,000 polls per client
    python -m bench.provider_calls --rounds 3 --calls 5000

The fal emulator holds one job IN_PROGRESS (its latency is an hour) on core 1; this process
polls the job's status URL on core 0, 20 polls at a time, and reads its own CPU time
(time.process_time) around each cell. The clients take turns every round, so drift in the
machine's load hits all alike:
  gateway   gateway.app's provider client: httpx over aiohttp, no cookie jar, the status
            URL parsed once and kept (gateway/transport.py)
  before    the same client as it was: httpx's cookie jar and aiohttp's, the URL parsed
            on every call
  aiohttp   an aiohttp session alone, no httpx above it
The exit code is always 0: this is a measurement, the figures are for the closing note.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson

from bench.load import KEY, MODEL_PATH, fal_emulator
from gateway.app import _provider_client
from gateway.transport import ProviderClient, ProviderTransport

CONCURRENCY = 20
AUTH = {"Authorization": f"Key {KEY}"}

Poll = Callable[[], Awaitable[object]]


async def _cell(poll: Poll, calls: int) -> float:
    """CPU seconds per call, over `calls` polls made CONCURRENCY at a time."""

    async def worker(count: int) -> None:
        for _ in range(count):
            await poll()

    began = time.process_time()
    await asyncio.gather(*(worker(calls // CONCURRENCY) for _ in range(CONCURRENCY)))
    return (time.process_time() - began) / (calls // CONCURRENCY * CONCURRENCY)


async def measure(base: str, rounds: int, calls: int) -> dict[str, list[float]]:
    gateway = _provider_client()
    before = _AsItWas(
        transport=_JarTransport(limits=httpx.Limits(max_connections=200)),
        timeout=httpx.Timeout(30.0, connect=5.0),
        headers={"User-Agent": "upscale-gateway/0.1"},
        follow_redirects=False,
    )
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200))
    async with gateway, before, session:
        submitted = await gateway.post(
            f"{base}/{MODEL_PATH}", json={"image_url": _PIXEL}, headers=AUTH
        )
        submitted.raise_for_status()
        status_url: str = submitted.json()["status_url"]

        async def via_gateway() -> object:
            response = await gateway.request("GET", status_url, headers=AUTH, timeout=30)
            return orjson.loads(response.content)

        async def via_before() -> object:
            response = await before.request("GET", status_url, headers=AUTH, timeout=30)
            return orjson.loads(response.content)

        async def via_aiohttp() -> object:
            async with session.get(status_url, headers=AUTH) as response:
                return orjson.loads(await response.read())

        polls: dict[str, Poll] = {
            "gateway": via_gateway,
            "before": via_before,
            "aiohttp": via_aiohttp,
        }
        for poll in polls.values():  # connections, first-use caches
            await _cell(poll, CONCURRENCY * 10)
        taken: dict[str, list[float]] = {name: [] for name in polls}
        for turn in range(rounds):
            order = list(polls) if turn % 2 == 0 else list(reversed(polls))
            for name in order:
                taken[name].append(await _cell(polls[name], calls))
    return taken


class _AsItWas(ProviderClient):
    """The gateway's client before: httpx's cookie jar, the URL parsed on every call."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._cookies = httpx.Cookies()

    async def request(self, method: str, url: httpx.URL | str, **kwargs: Any) -> httpx.Response:
        return await httpx.AsyncClient.request(self, method, url, **kwargs)


class _JarTransport(ProviderTransport):
    """The transport as it was: aiohttp's session with its default cookie jar."""

    def get_client(self) -> aiohttp.ClientSession:
        limit = self.limits.max_connections
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(**({} if limit is None else {"limit": limit}))
        )


# A 1x1 PNG: the job only has to exist.
_PIXEL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4"
    "z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)


def report(taken: dict[str, list[float]]) -> None:
    median = {name: statistics.median(values) for name, values in taken.items()}
    print(f"\n{'client':8} {'us/call (median)':>17} {'min':>6} {'max':>6} {'/ before':>9}")
    for name, values in taken.items():
        print(
            f"{name:8} {median[name] * 1e6:17.0f} {min(values) * 1e6:6.0f}"
            f" {max(values) * 1e6:6.0f} {median[name] / median['before']:9.2f}"
        )
    print(
        f"\nhttpx's share above aiohttp: before {median['before'] - median['aiohttp']:.6f} s,"
        f" gateway {median['gateway'] - median['aiohttp']:.6f} s per call"
        f" ({(median['gateway'] - median['aiohttp']) / (median['before'] - median['aiohttp']):.2f}"
        " of before's)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.provider_calls", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000, help="per client and round")
    args = parser.parse_args()
    try:
        pinned = (os.cpu_count() or 1) >= 2
        with tempfile.TemporaryDirectory() as tmp:
            faults = '{"latency_ms": 3600000, "jitter_ms": 0}'
            with fal_emulator(Path(tmp), faults, 1, {1} if pinned else None) as emulator:
                if pinned:
                    os.sched_setaffinity(0, {0})
                print(f"fal emulator at {emulator.url}; {args.rounds} rounds x {args.calls} polls")
                report(asyncio.run(measure(emulator.url, args.rounds, args.calls)))
    except Exception:  # a measurement: report what went wrong, never fail the bench target
        traceback.print_exc()
        print("bench.provider_calls: no figures (see the error above)", file=sys.stderr)


if __name__ == "__main__":
    main()
