"""The providers' client leaves no answer for the garbage collector (gateway/transport.py):
over a real socket, through the aiohttp transport the gateway uses."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

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


def _cookie_setter() -> Starlette:
    """Sets a cookie on every answer and says which cookies it was sent."""

    async def answer(request: Request) -> JSONResponse:
        response = JSONResponse({"sent": request.headers.get("cookie")})
        response.set_cookie("session", "for-whoever-called-first")
        return response

    return Starlette(routes=[Route("/", answer)])


async def test_no_cookie_a_provider_set_goes_with_a_later_call() -> None:
    # One pooled client carries every key's calls: a cookie kept from one answer would go
    # with the next caller's request, and keeping it costs a cookie jar walk per call.
    with BackgroundServer(_cookie_setter()) as server:
        # A host name: aiohttp's jar would keep no cookie from an IP address anyway.
        url = server.url.replace("127.0.0.1", "localhost")
        async with ProviderClient(transport=ProviderTransport()) as client:
            for _ in range(3):
                response = await client.get(url)
                assert response.json() == {"sent": None}
                assert "set-cookie" in response.headers  # the answer is as it came
            assert not client.cookies
