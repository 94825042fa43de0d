"""Both adapters learn how long their provider's jobs of a size run and poll such a job first
after most of that (adapters/pace.py): checked against the emulators over real sockets,
counting the status calls each provider answered."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from adapters.base import Adapter, AdapterSettings, UpscaleJob
from adapters.emulators import (
    BackgroundServer,
    EmulatorConfig,
    FaultScript,
    create_fal_app,
    create_replicate_app,
)
from adapters.fal import FalAdapter
from adapters.pace import MIN_SEEN
from adapters.replicate import ReplicateAdapter
from gateway.transport import ProviderTransport
from tests.conftest import make_image

pytestmark = pytest.mark.anyio
KEY = "pace-key"
LATENCY_MS = 1000
PROVIDERS = {
    "fal": (create_fal_app, FalAdapter, "fal-ai/recraft/upscale/crisp"),
    "replicate": (create_replicate_app, ReplicateAdapter, "recraft-ai/recraft-crisp-upscale"),
}


@pytest.fixture(scope="module", params=sorted(PROVIDERS))
def emulator(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    create = PROVIDERS[request.param][0]
    config = EmulatorConfig(api_key=KEY, faults=FaultScript(latency_ms=LATENCY_MS, jitter_ms=0))
    with BackgroundServer(create(config)) as server:
        yield request.param, server.url


@pytest.fixture
async def adapter(emulator: tuple[str, str]) -> AsyncIterator[Adapter]:
    name, url = emulator
    _, cls, model = PROVIDERS[name]
    # The shipped schedule (config/gateway.yaml): 0.1 s, growing 1.5x, at most 1 s apart.
    settings = AdapterSettings(name, model, url, KEY, poll_initial_s=0.1, poll_max_s=1.0)
    async with httpx.AsyncClient(transport=ProviderTransport(), timeout=30) as client:
        adapter = cls(settings, client)
        yield adapter
        await adapter.aclose()


def polls(url: str) -> int:
    return int(httpx.get(f"{url}/_emulator/stats", timeout=5).json().get("status_polls", 0))


def faults(url: str, latency_ms: int) -> None:
    body = {"latency_ms": latency_ms, "jitter_ms": 0}
    httpx.put(f"{url}/_emulator/faults", json=body, timeout=5).raise_for_status()


async def upscale(adapter: Adapter, url: str, image: bytes) -> int:
    """One job to its end; the status calls the provider answered for it."""
    before = polls(url)
    job = UpscaleJob(image, 64, 64, time.monotonic() + 30, "pace")
    result = await adapter.upscale(job)
    assert result.image
    return polls(url) - before


async def test_learned_jobs_are_polled_less(adapter: Adapter, emulator: tuple[str, str]) -> None:
    _, url = emulator
    image = make_image(64, 64)
    # 1 s jobs on the fixed schedule: polled at 0.1, 0.25, 0.48, 0.81, then found done at
    # 1.31 (fal's also at 0: its submit answer says nothing of the job's state).
    unpaced = [await upscale(adapter, url, image) for _ in range(MIN_SEEN)]
    assert min(unpaced) >= 5, unpaced
    # Then the first poll comes after 0.9 of the run time the provider reported, and the
    # schedule starts over: polled at 0.9, 1.0, then found done by 1.15 or 1.38.
    paced = [await upscale(adapter, url, image) for _ in range(3)]
    assert max(paced) <= 4 < min(unpaced), (unpaced, paced)


async def test_a_size_not_seen_is_polled_from_its_start(
    adapter: Adapter, emulator: tuple[str, str]
) -> None:
    _, url = emulator
    for _ in range(MIN_SEEN):
        await upscale(adapter, url, make_image(64, 64))
    faults(url, 300)
    try:
        before = polls(url)
        small = UpscaleJob(make_image(32, 32), 32, 32, time.monotonic() + 30, "pace")
        await adapter.upscale(small)
        # Found running at its first poll (a wait learned from the 1 s jobs would have
        # found it done at 0.9 s, at one poll).
        assert polls(url) - before >= 2
    finally:
        faults(url, LATENCY_MS)
