"""The providers' HTTP transport: httpx's API over aiohttp's connection pool and parser.

httpcore walks every pooled connection (a poll syscall each) on every request and reads
bodies 64 KiB at a time through several Python layers; with megabyte images and four calls
per upscale that was most of the gateway's CPU (bench/overhead.py). aiohttp does the same
work in C. The adapters keep the httpx interface, so their unit tests' MockTransport and
error mapping stay as they are."""

from __future__ import annotations

import functools
from typing import Any

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import AiohttpResponseStream

# Bodies are handed over as they arrive, up to 1 MiB a piece (the library reads 16 KiB).
AiohttpResponseStream.CHUNK_SIZE = 1 << 20


def _plain(exc: httpx.TransportError) -> httpx.TransportError:
    """The library files every connection failure under ConnectTimeout; a refused or reset
    connection is not a timeout, and the gateway's errors say which it was."""
    cause = exc.__cause__
    if isinstance(cause, aiohttp.ServerTimeoutError) or not isinstance(exc, httpx.ConnectTimeout):
        return exc
    if isinstance(cause, aiohttp.ClientConnectorError):
        return httpx.ConnectError(str(exc))
    if isinstance(cause, aiohttp.ClientConnectionError):  # reset, server disconnected
        return httpx.ReadError(str(exc))
    return exc


class ProviderTransport(AiohttpTransport):
    """One aiohttp pool per provider, created on first use inside the running loop, keeping
    no cookies (see ProviderClient)."""

    def get_client(self) -> aiohttp.ClientSession:
        if self.client is not None or self.uds:
            return super().get_client()
        # The library's own pool, as it builds it for TCP, with a jar that keeps nothing.
        limit = self.limits.max_connections
        connector = aiohttp.TCPConnector(
            keepalive_timeout=self.limits.keepalive_expiry,
            ssl=self.ssl_context,
            local_addr=(self.local_address, 0) if self.local_address else None,
            **({} if limit is None else {"limit": limit}),
        )
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except httpx.TransportError as exc:
            plain = _plain(exc)
            if plain is exc:
                raise
            raise plain from exc.__cause__


@functools.lru_cache(maxsize=4096)  # more than the jobs one process polls at once
def _parsed(url: str) -> httpx.URL:
    return httpx.URL(url)


class _NoCookies(httpx.Cookies):
    """A jar that keeps nothing: httpx walks the standard library's cookie jar on every
    answer, a sixth of a status poll's CPU in httpx (bench/provider_calls.py)."""

    def extract_cookies(self, response: httpx.Response) -> None:
        pass


class ProviderClient(httpx.AsyncClient):
    """httpx's client, whose read answers leave nothing for the garbage collector.

    httpx binds each answer's stream to the answer itself (a reference cycle), so every
    provider call, status polls included, left its answer, the aiohttp answer under it and
    their buffers for the collector to find: 35,000 unreachable objects at 300 requests in
    flight, and full collections that stalled the event loop for 200-450 ms (bench/scale.py).
    Once the body is read, the stream is spent (httpx closed it): it is swapped for an empty
    one, and the answer is freed the moment the caller lets go of it.

    It keeps no cookies, here or in the aiohttp session under it: one client carries every
    caller's calls to a provider, which authenticate by key, so a cookie one answer set
    would otherwise go with another caller's request."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._cookies = _NoCookies()

    async def request(self, method: str, url: httpx.URL | str, **kwargs: Any) -> httpx.Response:
        # A job's status URL is polled again and again: parsed once, not on every call.
        return await super().request(
            method, _parsed(url) if isinstance(url, str) else url, **kwargs
        )

    async def send(
        self, request: httpx.Request, *, stream: bool = False, **kwargs: Any
    ) -> httpx.Response:
        response = await super().send(request, stream=stream, **kwargs)
        if not stream:
            response.stream = httpx.ByteStream(b"")
        return response
