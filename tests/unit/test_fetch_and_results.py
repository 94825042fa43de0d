from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import time
from pathlib import Path

import httpx
import pytest

from gateway.config import FetchConfig
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


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert not _forbidden(ipaddress.ip_address(address))


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
