from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from starlette.requests import Request

from gateway.api.context import Services
from gateway.config import FetchConfig, GatewayConfig
from gateway.errors import InvalidRequest, PayloadTooLarge, ResultsUnavailable
from gateway.fetch import ImageFetcher, _forbidden, decode_data_uri
from gateway.results import FileResultStore, UrlSigner


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "::1",
        "fe80::1",
        "::ffff:127.0.0.1",
        "0.0.0.0",
        "fc00::1",
    ],
)
def test_internal_addresses_are_forbidden(address: str) -> None:
    assert _forbidden(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address",
    [
        "93.184.216.34",
        "2606:2800:220:1:248:1893:25c8:1946",
        "2002:5db8:d822::1",  # 6to4 of a public IPv4 is an ordinary route
    ],
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert not _forbidden(ipaddress.ip_address(address))


# IPv6 forms that carry an IPv4 address a relay or translator delivers to: each names an
# inward IPv4, so each is as forbidden as that IPv4 itself.
EMBEDDED_INWARD = [
    # 6to4, 2002::/16: the IPv4 in bits 16-48.
    "2002:7f00:1::",  # 127.0.0.1
    "2002:7f00:1::1",
    "2002:a00:7::1",  # 10.0.0.7
    "2002:c0a8:101::1",  # 192.168.1.1
    "2002:a9fe:a9fe::1",  # 169.254.169.254, the metadata service
    "2002:6440:1::1",  # 100.64.0.1, carrier-grade NAT
    "2002::1",  # 0.0.0.0
    "2002:e000:1::1",  # 224.0.0.1, multicast
    "2002:f000:1::1",  # 240.0.0.1, reserved
    # Teredo, 2001::/32: the server IPv4 in bits 32-64, the client's in the last 32 bits
    # with every bit flipped.
    "2001:0:5db8:d822::80ff:fffe",  # server 93.184.216.34, client 127.0.0.1
    "2001:0:5db8:d822::f5ff:fff8",  # client 10.0.0.7
    "2001:0:5db8:d822::5601:5601",  # client 169.254.169.254
    "2001:0:a00:7::a247:27dd",  # server 10.0.0.7, client 93.184.216.34
    "2001:0:7f00:1::a247:27dd",  # server 127.0.0.1
    # NAT64, the well-known prefix 64:ff9b::/96 (the IPv4 in the last 32 bits) ...
    "64:ff9b::7f00:1",
    "64:ff9b::a00:7",
    "64:ff9b::a9fe:a9fe",
    "64:ff9b::c0a8:101",
    # ... and the local-use 64:ff9b:1::/48, whose IPv4 sits where each network chooses.
    "64:ff9b:1::7f00:1",
    "64:ff9b:1:7f00:1::",
    "64:ff9b:1:ffff::a9fe:a9fe",
    # IPv4-compatible ::a.b.c.d, IPv4-mapped ::ffff:a.b.c.d and IPv4-translated
    # ::ffff:0:a.b.c.d.
    "::127.0.0.1",
    "::10.0.0.7",
    "::169.254.169.254",
    "::ffff:10.0.0.7",
    "::ffff:169.254.169.254",
    "::ffff:0:7f00:1",
    "::ffff:0:a9fe:a9fe",
]


@pytest.mark.parametrize("address", EMBEDDED_INWARD)
def test_ipv6_that_embeds_an_inward_ipv4_is_forbidden(address: str) -> None:
    assert _forbidden(ipaddress.ip_address(address))


def dns_answers(table: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    async def resolver(host: str, port: int) -> list[str]:
        return table[host]

    return resolver


def refusing_fetcher(resolver=None) -> ImageFetcher:  # type: ignore[no-untyped-def]
    def never(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"no connection may be made, yet one went to {request.url}")

    client = httpx.AsyncClient(transport=httpx.MockTransport(never))
    if resolver is None:
        return ImageFetcher(FetchConfig(), client, 1000)
    return ImageFetcher(FetchConfig(), client, 1000, resolver=resolver)


@pytest.mark.anyio
@pytest.mark.parametrize("address", EMBEDDED_INWARD)
async def test_fetcher_refuses_an_embedded_inward_literal(address: str) -> None:
    # The real resolver: getaddrinfo hands a literal back as itself, with no lookup.
    with pytest.raises(InvalidRequest) as err:
        await refusing_fetcher().load(f"https://[{address}]/x.png")
    assert err.value.code == "image_url_forbidden", err.value


@pytest.mark.anyio
@pytest.mark.parametrize("address", EMBEDDED_INWARD)
async def test_fetcher_refuses_a_name_that_resolves_to_an_embedded_inward(address: str) -> None:
    # The public answer first, as a resolver may order them: every answer is vetted.
    dns = dns_answers({"sneaky.test": ["93.184.216.34", address]})
    with pytest.raises(InvalidRequest) as err:
        await refusing_fetcher(dns).load("https://sneaky.test/x.png")
    assert err.value.code == "image_url_forbidden", err.value


@pytest.mark.anyio
async def test_fetcher_reaches_a_public_6to4_address() -> None:
    seen: list[httpx.Request] = []

    def site(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"img")

    fetcher = ImageFetcher(
        FetchConfig(),
        httpx.AsyncClient(transport=httpx.MockTransport(site)),
        1000,
        resolver=dns_answers({"six.test": ["2002:5db8:d822::1"]}),
    )
    assert await fetcher.load("https://six.test/x.png") == b"img"
    assert [r.url.host for r in seen] == ["2002:5db8:d822::1"]


def test_data_uri() -> None:
    uri = "data:image/png;base64," + base64.b64encode(b"abc").decode()
    assert decode_data_uri(uri, 100) == b"abc"
    with pytest.raises(InvalidRequest):
        decode_data_uri("data:image/png,abc", 100)
    with pytest.raises(InvalidRequest):
        decode_data_uri("data:image/png;base64,@@@", 100)
    with pytest.raises(PayloadTooLarge):
        decode_data_uri("data:image/png;base64," + "A" * 400, 100)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.png",
        "https://localhost/x.png",
        "ftp://example.com/x",
        "https://169.254.169.254/latest/meta-data",
        "file:///etc/passwd",
    ],
)
async def test_fetcher_refuses_before_connecting(url: str) -> None:
    def never(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no connection may be made")

    fetcher = ImageFetcher(
        FetchConfig(), httpx.AsyncClient(transport=httpx.MockTransport(never)), 1000
    )
    with pytest.raises(InvalidRequest) as err:
        await fetcher.load(url)
    assert err.value.param == "image"


def test_signatures() -> None:
    signer = UrlSigner(b"k" * 32)
    expires = int(time.time()) + 60
    sig = signer.signature("img_a.png", expires)
    assert signer.verify("img_a.png", expires, sig)
    assert not signer.verify("img_b.png", expires, sig)
    assert not signer.verify("img_a.png", expires + 1, sig)
    assert not UrlSigner(b"other").verify("img_a.png", expires, sig)
    past = int(time.time()) - 1
    assert not signer.verify("img_a.png", past, signer.signature("img_a.png", past))


@pytest.mark.anyio
async def test_store_put_path_and_sweep(tmp_path: Path) -> None:
    store = FileResultStore(tmp_path, ttl_s=60)
    store.open()
    file_id = await store.put(b"data", "webp")
    assert store.content_type(file_id) == "image/webp"
    path = store.path(file_id)
    assert path is not None and path.read_bytes() == b"data"
    assert store.path("../etc/passwd") is None and store.path("img_x.exe") is None
    os.utime(path, (time.time() - 120, time.time() - 120))
    assert store.sweep() == 1 and store.path(file_id) is None


@pytest.mark.anyio
async def test_store_keeps_under_its_byte_cap_oldest_first(tmp_path: Path) -> None:
    store = FileResultStore(tmp_path, ttl_s=3600, max_bytes=1000)
    store.open()
    ids = []
    for age in range(5, 0, -1):  # written oldest first
        ids.append(await store.put(b"x" * 300, "png"))
        path = store.path(ids[-1])
        assert path is not None
        os.utime(path, (time.time() - age, time.time() - age))
    await asyncio.gather(*[t for t in [store._trimming] if t is not None])
    store.sweep()
    left = [i for i in ids if store.path(i) is not None]
    assert left == ids[-3:]  # 900 bytes: the three newest
    await store.keep(ids[-3], 7200)  # kept for an idempotent replay: now the youngest
    await store.put(b"x" * 300, "png")
    store.sweep()
    assert store.path(ids[-3]) is not None and store.path(ids[-2]) is None


@pytest.mark.anyio
async def test_store_that_cannot_write_is_a_clear_503(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    store = FileResultStore(blocker, ttl_s=60)
    with pytest.raises(ResultsUnavailable) as err:
        await store.put(b"data", "png")
    assert err.value.status == 503 and err.value.code == "results_storage_unavailable"


def fake_dns(table: dict[str, str]):  # type: ignore[no-untyped-def]
    async def resolver(host: str, port: int) -> list[str]:
        return [table[host]]

    return resolver


@pytest.mark.anyio
async def test_redirect_to_an_internal_address_is_refused() -> None:
    seen: list[httpx.Request] = []

    def site(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(302, headers={"location": "https://internal.test/secret"})

    dns = fake_dns({"public.test": "93.184.216.34", "internal.test": "10.0.0.7"})
    fetcher = ImageFetcher(
        FetchConfig(), httpx.AsyncClient(transport=httpx.MockTransport(site)), 1000, resolver=dns
    )
    with pytest.raises(InvalidRequest) as err:
        await fetcher.load("https://public.test/img.png")
    assert err.value.code == "image_url_forbidden"
    # The first hop went to the vetted address with the original Host; no second hop was made.
    assert [r.url.host for r in seen] == ["93.184.216.34"]
    assert seen[0].headers["host"] == "public.test"
    assert seen[0].extensions["sni_hostname"] == "public.test"


@pytest.mark.anyio
async def test_fetch_is_bounded_in_bytes() -> None:
    def site(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"x" * 2000)

    fetcher = ImageFetcher(
        FetchConfig(),
        httpx.AsyncClient(transport=httpx.MockTransport(site)),
        1000,
        resolver=fake_dns({"public.test": "93.184.216.34"}),
    )
    with pytest.raises(PayloadTooLarge):
        await fetcher.load("https://public.test/big.png")


def result_url(scope: dict[str, Any], public_url: str | None = None) -> str:
    svc = SimpleNamespace(
        config=GatewayConfig(), signer=UrlSigner(b"k" * 32), public_url=public_url
    )
    svc.base_url = lambda request: Services.base_url(svc, request)  # type: ignore[arg-type]
    svc._signed = lambda base, file_id: Services._signed(svc, base, file_id)  # type: ignore[arg-type]
    request = Request({"type": "http", "headers": [], "path": "/", "query_string": b"", **scope})
    url: str = Services.signed_url(svc, request, "img_a.png")  # type: ignore[arg-type]
    return url.partition("?")[0]


@pytest.mark.parametrize(
    ("scope", "base"),
    [
        ({"scheme": "http", "server": ("127.0.0.1", 8080)}, "http://127.0.0.1:8080"),
        ({"scheme": "http", "server": ("10.0.0.5", 80)}, "http://10.0.0.5"),
        ({"scheme": "https", "server": ("10.0.0.5", 443)}, "https://10.0.0.5"),
        ({"scheme": "https", "server": ("10.0.0.5", 80)}, "https://10.0.0.5:80"),
        ({"scheme": "http", "server": ("::1", 8080)}, "http://[::1]:8080"),
        ({"scheme": "http", "server": ("fe80::1%eth0", 8080)}, "http://[fe80::1]:8080"),
        ({"scheme": "http", "server": None}, ""),  # a Unix socket: the path alone
    ],
)
def test_result_urls_name_the_socket_address_not_the_host_header(
    scope: dict[str, Any], base: str
) -> None:
    headers = [(b"host", b"attacker.example:8443")]
    assert result_url({**scope, "headers": headers}) == f"{base}/v1/files/img_a.png/content"


def test_result_urls_use_the_public_url_when_set() -> None:
    scope = {"scheme": "http", "server": ("127.0.0.1", 8080)}
    assert result_url(scope, "https://gw.example.com/") == (
        "https://gw.example.com/v1/files/img_a.png/content"
    )
