"""Loading the image a JSON body names: a data URI, or a URL fetched with guards against
server-side request forgery (no loopback, private or link-local targets, nor IPv6 addresses
that embed one: 6to4, Teredo, NAT64, IPv4-compatible or -mapped), every DNS answer vetted,
re-checked on every redirect and pinned to the checked address so DNS cannot change its answer
in between)."""

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
# IPv6 forms a relay or translator turns into an IPv4 destination (the IPv4 one's rules then
# apply). Read here, not left to ipaddress's is_private/is_reserved tables: those follow the
# IANA registry, which lists 6to4 as global and changes between Python releases.
_TEREDO = ipaddress.ip_network("2001::/32")  # RFC 4380
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052, the IPv4 in the last 32 bits
# RFC 8215: each network puts the IPv4 where its own prefix length says, so no one place can
# be read; and it is local by definition, never a public destination.
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_COMPATIBLE = ipaddress.ip_network("::/96")  # ::a.b.c.d, deprecated (RFC 4291)
_TRANSLATED = ipaddress.ip_network("::ffff:0:0/96")  # ::ffff:0:a.b.c.d (RFC 2765)


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


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 one carries, for the forms that deliver to them."""
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour:  # 2002::/16, bits 16-48
        return [ip.sixtofour]
    if ip in _TEREDO:  # the server (bits 32-64), the client (last 32 bits, inverted)
        return list(ip.teredo or ())
    if ip in _NAT64 or ip in _TRANSLATED:
        return [low32]
    if ip in _COMPATIBLE and int(ip) > 1:  # :: and ::1 are IPv6's own
        return [low32]
    return []


def _forbidden(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:  # the socket speaks IPv4 to it: that address alone decides
            return _forbidden(ip.ipv4_mapped)
        if ip in _NAT64_LOCAL or any(_forbidden(v4) for v4 in _embedded_ipv4(ip)):
            return True
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


class UrlPolicy:
    """Which URLs the gateway may call out to (image URLs, webhook targets): https (http
    only if allowed), a host that resolves, and no loopback, private or link-local address
    unless the deployment allows private networks."""

    def __init__(self, config: FetchConfig, resolver: Resolver = resolve):
        self._config = config
        self._resolve = resolver

    async def vet(
        self, url: str, *, what: str = "image URL", param: str | None = "image"
    ) -> tuple[str, str]:
        """The URL rewritten to a vetted IP address (so DNS cannot change its answer
        between check and connect), and the Host header to send."""
        allowed = ("https", "http") if self._config.allow_http else ("https",)
        try:
            parts = urlsplit(url)
            hostname, port = parts.hostname, parts.port  # .port raises on a bad port
        except ValueError as exc:  # "https://[::1/x", ":99999", ":abc"
            raise InvalidRequest(f"The {what} is malformed: {exc}.", param=param) from None
        if parts.scheme.lower() not in allowed or not hostname:
            noun = "image must be a data URI or" if what == "image URL" else f"{what} must be"
            raise InvalidRequest(f"The {noun} an {' or '.join(allowed)} URL.", param=param)
        port = port or (443 if parts.scheme.lower() == "https" else 80)
        try:
            addresses = [ipaddress.ip_address(a) for a in await self._resolve(hostname, port)]
        except (OSError, ValueError):
            raise InvalidRequest(
                f"The {what}'s host {parts.hostname!r} does not resolve.",
                param=param,
                code="image_fetch_failed",
            ) from None
        if not addresses:
            raise InvalidRequest(f"The {what}'s host has no address.", param=param)
        if not self._config.allow_private_networks and any(_forbidden(a) for a in addresses):
            raise InvalidRequest(
                f"The {what} points at a loopback, private or link-local address.",
                param=param,
                code="image_url_forbidden",
            )
        ip = addresses[0]
        netloc = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
        host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        return parts._replace(netloc=netloc).geturl(), host


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
        self.policy = UrlPolicy(config, resolver)

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
            target, host = await self.policy.vet(url)
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
