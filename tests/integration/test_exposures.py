"""What the gateway exposes beyond its API, through real processes: image URLs whose IPv6
address embeds an inward IPv4 are refused as such (not merely failing to connect); result
URLs never take their host from the client's Host header; and a sandbox's in-process
emulators answer neither their provider API nor their /_emulator/* routes (fault script,
request log, jobs) to anyone on the host without the sandbox's own per-process key."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from adapters.emulators import (
    BackgroundServer,
    EmulatorConfig,
    FaultScript,
    create_fal_app,
    create_replicate_app,
)
from adapters.emulators.fal import APP_ID
from adapters.emulators.replicate import MODEL as REPLICATE_MODEL
from tests.conftest import make_image
from tests.integration.conftest import Emulator, write_config
from tests.integration.servers import GatewayProcess

MODEL = "recraft-crisp-upscale"
OLD_SANDBOX_KEY = "sandbox-key"  # the fixed key every sandbox once had
CHOSEN_KEY = "exposures-sandbox-key-1b9e4d7c"
ADMIN_ROUTES = (
    ("GET", "/_emulator/faults"),
    ("PUT", "/_emulator/faults"),
    ("PATCH", "/_emulator/faults"),
    ("GET", "/_emulator/requests"),
    ("DELETE", "/_emulator/requests"),
    ("GET", "/_emulator/stats"),
    ("GET", "/_emulator/jobs"),
)
# The fault script a stranger on the host would set: every later provider call fails.
SABOTAGE = {"error_rate": 1, "error_status": 500}


def upscale(gateway: GatewayProcess, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/images/edits",
        headers=headers or {},
        files={"image": ("a.png", make_image(40, 36), "image/png")},
        data={"model": MODEL},
        timeout=60,
    )


# --- image URLs: IPv6 forms that carry an inward IPv4 -----------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://[2002:7f00:1::1]/x.png",  # 6to4 of 127.0.0.1
        "https://[2002:a9fe:a9fe::1]/latest/meta-data",  # 6to4 of the metadata service
        "https://[2001:0:5db8:d822::80ff:fffe]/x.png",  # Teredo, client 127.0.0.1
        "https://[64:ff9b::a00:7]/x.png",  # NAT64 of 10.0.0.7
        "https://[64:ff9b:1::a00:7]/x.png",  # local-use NAT64
        "https://[::127.0.0.1]/x.png",  # IPv4-compatible
    ],
)
def test_embedded_inward_ipv4_is_refused_before_connecting(
    gateway: GatewayProcess, emulators: tuple[Emulator, Emulator], url: str
) -> None:
    answer = httpx.post(
        f"{gateway.url}/v1/images/edits",
        json={"model": MODEL, "image": url},
        timeout=30,
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    # Refused for where it points, not for failing to connect (image_fetch_failed).
    assert (error["param"], error["code"]) == ("image", "image_url_forbidden"), error
    fal, replicate = emulators
    assert fal.requests() == [] and replicate.requests() == []


# --- result URLs: the host is the gateway's, not the client's ---------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "attacker.example"},
        {"Host": "attacker.example:8443"},
        {"Host": "127.0.0.1.attacker.example"},
        {"X-Forwarded-Host": "attacker.example", "Forwarded": "host=attacker.example"},
    ],
)
def test_result_urls_ignore_the_host_header(
    gateway: GatewayProcess, emulators: tuple[Emulator, Emulator], headers: dict[str, str]
) -> None:
    answer = upscale(gateway, headers)
    assert answer.status_code == 200, answer.text
    url = answer.json()["data"][0]["url"]
    assert "attacker" not in url, url
    assert url.startswith(f"{gateway.url}/v1/files/"), url  # where the connection went
    fetched = httpx.get(url, timeout=10)
    assert fetched.status_code == 200 and Image.open(io.BytesIO(fetched.content)).size


@pytest.fixture(scope="module")
def wildcard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """Bound to every interface: its URLs name the address a connection arrived on."""
    workdir = tmp_path_factory.mktemp("wildcard")
    process = GatewayProcess(
        {"GATEWAY_CONFIG": str(write_config(workdir / "g.yaml")), "GATEWAY_HOST": "0.0.0.0"},
        workdir,
        args=("--sandbox",),
    ).start()
    yield process
    process.stop()


def test_wildcard_bound_result_urls_name_the_address_connected_to(
    wildcard: GatewayProcess,
) -> None:
    answer = upscale(wildcard, {"Host": "attacker.example"})
    assert answer.status_code == 200, answer.text
    url = answer.json()["data"][0]["url"]
    assert url.startswith(f"http://127.0.0.1:{wildcard.port}/v1/files/"), url
    assert httpx.get(url, timeout=10).status_code == 200


# --- sandbox emulators: closed to everyone but their gateway ----------------------------


def emulator_urls(gateway: GatewayProcess) -> dict[str, str]:
    # The admin sees the providers' addresses there (the key is no part of it).
    admin = {"Authorization": f"Bearer {gateway.admin_key}"}
    ready = httpx.get(f"{gateway.url}/readyz", headers=admin, timeout=5).json()
    urls = {p["name"]: p["base_url"] for p in ready["providers"] if p["emulated"]}
    assert set(urls) == {"fal", "replicate"}, ready
    return urls


def sandbox_gateway(workdir: Path, **env: str) -> GatewayProcess:
    config = write_config(workdir / "g.yaml", sandbox={"latency_ms": 0, "jitter_ms": 0})
    return GatewayProcess(
        {"GATEWAY_CONFIG": str(config), **env}, workdir, args=("--sandbox",)
    ).start()


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = sandbox_gateway(tmp_path_factory.mktemp("sandbox"))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def chosen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A sandbox whose key the tests chose, through GATEWAY_SANDBOX_KEY."""
    process = sandbox_gateway(tmp_path_factory.mktemp("chosen"), GATEWAY_SANDBOX_KEY=CHOSEN_KEY)
    yield process
    process.stop()


def call(url: str, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    body = SABOTAGE if method in ("PUT", "PATCH") else None
    return httpx.request(method, f"{url}{path}", json=body, headers=headers, timeout=10)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": f"Key {OLD_SANDBOX_KEY}"},
        {"Authorization": f"Bearer {OLD_SANDBOX_KEY}"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {CHOSEN_KEY}"},  # another sandbox's key
    ],
)
def test_sandbox_emulator_admin_routes_refuse_strangers(
    sandbox: GatewayProcess, headers: dict[str, str]
) -> None:
    for name, url in emulator_urls(sandbox).items():
        for method, path in ADMIN_ROUTES:
            answer = call(url, method, path, headers)
            assert answer.status_code == 401, (name, method, path, answer.status_code)
            assert "requests" not in answer.text and "jobs" not in answer.text
    # The sabotage took nowhere: the gateway still upscales on its emulators.
    assert upscale(sandbox).status_code == 200


def test_sandbox_provider_apis_refuse_the_old_fixed_key(sandbox: GatewayProcess) -> None:
    urls = emulator_urls(sandbox)
    image = "data:image/png;base64,iVBORw0KGgo="
    fal = httpx.post(
        f"{urls['fal']}/{APP_ID}",
        headers={"Authorization": f"Key {OLD_SANDBOX_KEY}"},
        json={"image_url": image},
        timeout=10,
    )
    replicate = httpx.post(
        f"{urls['replicate']}/v1/models/{REPLICATE_MODEL}/predictions",
        headers={"Authorization": f"Bearer {OLD_SANDBOX_KEY}"},
        json={"input": {"image": image}},
        timeout=10,
    )
    assert (fal.status_code, replicate.status_code) == (401, 401), (fal.text, replicate.text)


def test_a_chosen_sandbox_key_opens_the_admin_routes(chosen: GatewayProcess) -> None:
    assert upscale(chosen).status_code == 200
    urls = emulator_urls(chosen)
    billed = 0
    for name, url in urls.items():
        for scheme in ("Bearer", "Key"):  # Replicate's scheme and fal's
            answer = httpx.get(
                f"{url}/_emulator/jobs",
                headers={"Authorization": f"{scheme} {CHOSEN_KEY}"},
                timeout=10,
            )
            assert answer.status_code == 200, (name, scheme, answer.text)
        billed += answer.json()["billed_micros"]
        assert call(url, "GET", "/_emulator/jobs", {}).status_code == 401
    assert billed > 0  # the upscale above is in one of the two ledgers
    # Neither the gateway's answers nor its log carry the key.
    for route in ("/readyz", "/status.json", "/v1/models"):
        assert CHOSEN_KEY not in httpx.get(f"{chosen.url}{route}", timeout=5).text
    assert CHOSEN_KEY not in chosen.log_path.read_text(errors="replace")


# --- standalone emulators: admin routes open unless asked otherwise ---------------------


@pytest.mark.parametrize("factory", [create_fal_app, create_replicate_app])
def test_standalone_emulator_admin_routes(factory) -> None:  # type: ignore[no-untyped-def]
    quiet = FaultScript(latency_ms=0, jitter_ms=0)
    with BackgroundServer(factory(EmulatorConfig(api_key="k", faults=quiet))) as server:
        for method, path in ADMIN_ROUTES:
            answer = call(server.url, method, path, {})
            assert answer.status_code in (200, 204), (method, path, answer.text)
    guarded = EmulatorConfig(api_key="k", admin_key="adm-7", faults=quiet)
    with BackgroundServer(factory(guarded)) as server:
        for method, path in ADMIN_ROUTES:
            assert call(server.url, method, path, {}).status_code == 401, (method, path)
            wrong = {"Authorization": "Bearer k"}  # the provider key is not the admin key
            assert call(server.url, method, path, wrong).status_code == 401, (method, path)
            right = {"Authorization": "Bearer adm-7"}
            assert call(server.url, method, path, right).status_code in (200, 204), (method, path)


def test_the_landing_page_ignores_the_host_header(gateway: GatewayProcess) -> None:
    # Its curl and SDK examples name the gateway: a forged Host must not put another host
    # in a page that caches and people copy from.
    page = httpx.get(f"{gateway.url}/", headers={"Host": "attacker.example"}).text
    assert "attacker" not in page
    assert f"{gateway.url}/v1/images/edits" in page
