"""The providers' HTTP transport: httpx's API over aiohttp's connection pool and parser.

httpcore walks every pooled connection (a poll syscall each) on every request and reads
bodies 64 KiB at a time through several Python layers; with megabyte images and four calls
per upscale that was most of the gateway's CPU (bench/overhead.py). aiohttp does the same
work in C. The adapters keep the httpx interface, so their unit tests' MockTransport and
error mapping stay as they are."""

from __future__ import annotations

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
    """One aiohttp pool per provider, created on first use inside the running loop."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except httpx.TransportError as exc:
            plain = _plain(exc)
            if plain is exc:
                raise
            raise plain from exc.__cause__
