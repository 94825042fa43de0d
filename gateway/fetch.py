"""Loading the image a JSON body names: a data URI, or a URL fetched with guards against
server-side request forgery (no loopback, private or link-local targets, re-checked on every
redirect and pinned to the checked address so DNS cannot change its answer in between)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urljoin, urlsplit

import httpx

from gateway.config import FetchConfig
from gateway.errors import InvalidRequest, PayloadTooLarge

_CGNAT = ipaddress.ip_network("100.64.0.0/10")


def decode_data_uri(uri: str, max_bytes: int) -> bytes:
    head, sep, payload = uri.partition(",")
    if not sep or not head.lower().endswith(";base64"):
        raise InvalidRequest("The data URI must be base64 encoded.", param="image")
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise PayloadTooLarge(f"The image is larger than {max_bytes} bytes.", param="image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("The data URI's base64 does not decode.", param="image") from None


def _forbidden(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or (isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT)
    )


Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]).split("%")[0] for info in infos]


class ImageFetcher:
    def __init__(
        self,
        config: FetchConfig,
        client: httpx.AsyncClient,
        max_bytes: int,
        resolver: Resolver = resolve,
    ):
        self._config = config
        self._client = client
        self._max_bytes = max_bytes
        self._resolve = resolver

    async def load(self, ref: str) -> bytes:
        if ref[:5].lower() == "data:":
            return decode_data_uri(ref, self._max_bytes)
        try:
            async with asyncio.timeout(self._config.timeout_s):
                return await self._fetch(ref)
        except TimeoutError:
            raise InvalidRequest(
                f"The image URL did not answer within {self._config.timeout_s:g} s.",
                param="image",
                code="image_fetch_failed",
            ) from None

    async def _fetch(self, url: str) -> bytes:
        for _ in range(self._config.max_redirects + 1):
            target, host = await self._checked_target(url)
            try:
                async with self._client.stream(
                    "GET",
                    target,
                    headers={"Host": host, "Accept": "image/*"},
                    extensions={"sni_hostname": urlsplit(url).hostname or ""},
                    follow_redirects=False,
                ) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise InvalidRequest(
                            f"The image URL answered HTTP {response.status_code}.",
                            param="image",
                            code="image_fetch_failed",
                        )
                    return await self._read_bounded(response)
            except httpx.HTTPError as exc:
                raise InvalidRequest(
                    f"The image URL could not be fetched ({type(exc).__name__}).",
                    param="image",
                    code="image_fetch_failed",
                ) from exc
        raise InvalidRequest("The image URL redirects too often.", param="image")

    async def _read_bounded(self, response: httpx.Response) -> bytes:
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self._max_bytes:
            raise PayloadTooLarge(
                f"The image is larger than {self._max_bytes} bytes.", param="image"
            )
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > self._max_bytes:
                raise PayloadTooLarge(
                    f"The image is larger than {self._max_bytes} bytes.", param="image"
                )
        return bytes(body)

    async def _checked_target(self, url: str) -> tuple[str, str]:
        """The URL rewritten to a vetted IP address, and the Host header to send."""
        allowed = ("https", "http") if self._config.allow_http else ("https",)
        try:
            parts = urlsplit(url)
            hostname, port = parts.hostname, parts.port  # .port raises on a bad port
        except ValueError as exc:  # "https://[::1/x", ":99999", ":abc"
            raise InvalidRequest(f"The image URL is malformed: {exc}.", param="image") from None
        if parts.scheme.lower() not in allowed or not hostname:
            raise InvalidRequest(
                f"The image must be a data URI or an {' or '.join(allowed)} URL.", param="image"
            )
        port = port or (443 if parts.scheme.lower() == "https" else 80)
        try:
            addresses = [ipaddress.ip_address(a) for a in await self._resolve(hostname, port)]
        except (OSError, ValueError):
            raise InvalidRequest(
                f"The image URL's host {parts.hostname!r} does not resolve.",
                param="image",
                code="image_fetch_failed",
            ) from None
        if not addresses:
            raise InvalidRequest("The image URL's host has no address.", param="image")
        if not self._config.allow_private_networks and any(_forbidden(a) for a in addresses):
            raise InvalidRequest(
                "The image URL points at a loopback, private or link-local address.",
                param="image",
                code="image_url_forbidden",
            )
        ip = addresses[0]
        netloc = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
        host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        return parts._replace(netloc=netloc).geturl(), host
