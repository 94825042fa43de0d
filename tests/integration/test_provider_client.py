"""The providers' client leaves no answer for the garbage collector (gateway/transport.py):
over a real socket, through the aiohttp transport the gateway uses."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from adapters.emulators import BackgroundServer, EmulatorConfig, create_fal_app
from gateway.transport import ProviderClient, ProviderTransport

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with BackgroundServer(create_fal_app(EmulatorConfig(api_key="k"))) as server:
        yield server.url


@pytest.fixture
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def test_a_read_answer_is_freed_when_let_go(url: str, collector_off: None) -> None:
    async with ProviderClient(transport=ProviderTransport()) as client:
        for _ in range(3):  # on one pooled connection: each answer gave it back
            response = await client.get(f"{url}/_emulator/faults")
            assert response.status_code == 200 and "latency_ms" in response.json()
            assert response.text and response.content == await response.aread()
            await response.aclose()
            gone = weakref.ref(response)
            del response
            assert gone() is None  # by reference counting alone: no cycle held it


async def test_a_streamed_answer_is_read_as_before(url: str) -> None:
    async with (
        ProviderClient(transport=ProviderTransport()) as client,
        client.stream("GET", f"{url}/_emulator/faults") as response,
    ):
        body = b"".join([chunk async for chunk in response.aiter_bytes()])
    assert b"latency_ms" in body
