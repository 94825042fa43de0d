"""Security through the real gateway: image URLs aimed inward are refused before any
connection; file routes neither traverse nor serve without a valid signature; and no
provider key, client key, admin key or signing key appears in any response, log line or
metric, whatever was sent."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import make_image
from tests.integration.conftest import (
    FAL_KEY,
    REPLICATE_TOKEN,
    Emulator,
    start_gateway,
    write_config,
)
from tests.integration.servers import GatewayProcess

MODEL = "recraft-crisp-upscale"
CLIENT = "sk-sec-client-5f1d2c"
NAMED = "sk-sec-named-9a0b7e"
ADMIN = "admin-sec-3c4d"
SIGNING = "test-signing-key-0123456789abcdef"
SECRETS = (FAL_KEY, REPLICATE_TOKEN, CLIENT, NAMED, ADMIN, SIGNING)
INWARD = (
    "https://127.0.0.1/x.png",
    "https://localhost/x.png",
    "https://10.0.0.7/x.png",
    "https://192.168.1.1/x.png",
    "https://169.254.169.254/latest/meta-data/iam",
    "https://100.64.0.1/x.png",
    "https://[::1]/x.png",
    "https://[::ffff:127.0.0.1]/x.png",
    "https://[fe80::1]/x.png",
    "https://[fd00::1]/x.png",
    "https://[2002:7f00:1::1]/x.png",  # 6to4 of 127.0.0.1
    "https://[2002:a9fe:a9fe::1]/x.png",  # 6to4 of 169.254.169.254
    "https://[2001:0:5db8:d822::80ff:fffe]/x.png",  # Teredo, client 127.0.0.1
    "https://[64:ff9b::a9fe:a9fe]/x.png",  # NAT64 of 169.254.169.254
    "https://[64:ff9b:1::a00:7]/x.png",  # local-use NAT64
    "https://[::127.0.0.1]/x.png",  # IPv4-compatible
    "https://0.0.0.0/x.png",
    "https://2130706433/x.png",  # 127.0.0.1 as one number
    "https://0x7f.1/x.png",
    "http://93.184.216.34/x.png",  # plain http is off
    "file:///etc/passwd",
    "ftp://127.0.0.1/x.png",
)


@pytest.fixture(scope="module")
def guarded(
    tmp_path_factory: pytest.TempPathFactory, fal_emulator: Emulator, replicate_emulator: Emulator
) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("security")
    named = {"sha256": hashlib.sha256(NAMED.encode()).hexdigest()}
    config = write_config(workdir / "g.yaml", clients={"keys": {"named": named}})
    process = start_gateway(
        workdir,
        fal_emulator,
        replicate_emulator,
        config,
        GATEWAY_API_KEYS=CLIENT,
        GATEWAY_ADMIN_KEY=ADMIN,
    )
    yield process
    process.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("url", INWARD)
def test_image_urls_aimed_inward_are_refused(
    guarded: GatewayProcess, emulators: tuple[Emulator, Emulator], url: str
) -> None:
    answer = httpx.post(
        f"{guarded.url}/v1/images/edits",
        headers=bearer(CLIENT),
        json={"model": MODEL, "image": url},
        timeout=30,
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "image"
    fal, replicate = emulators
    assert fal.requests() == [] and replicate.requests() == []


def test_file_routes_neither_traverse_nor_serve_unsigned(guarded: GatewayProcess) -> None:
    made = httpx.post(
        f"{guarded.url}/v1/images/edits",
        headers=bearer(CLIENT),
        files={"image": ("a.png", make_image(40, 40), "image/png")},
        data={"model": MODEL},
        timeout=60,
    ).json()["data"][0]["url"]
    path, _, query = made.partition("?")
    probes = [
        f"{guarded.url}/v1/files/..%2f..%2fetc%2fpasswd/content?{query}",
        f"{guarded.url}/v1/files/%2e%2e/content?{query}",
        f"{guarded.url}/v1/files/../../etc/passwd/content?{query}",
        f"{guarded.url}/v1/files/img_{'A' * 30}.png%00.txt/content?{query}",
        f"{path}",  # no signature
        f"{path}?expires=9999999999&signature={'0' * 64}",  # forged
        path.replace("img_", "img_X") + f"?{query}",  # signature of another file
    ]
    for probe in probes:
        answer = httpx.get(probe)
        assert answer.status_code in (401, 404), (probe, answer.status_code)
        assert answer.headers["content-type"] == "application/json"
        assert b"root:" not in answer.content
    assert httpx.get(made).status_code == 200


def test_another_keys_idempotency_key_reveals_nothing(guarded: GatewayProcess) -> None:
    image = make_image(44, 40)

    def send(key: str) -> httpx.Response:
        return httpx.post(
            f"{guarded.url}/v1/images/edits",
            headers={**bearer(key), "Idempotency-Key": "shared-key-1"},
            files={"image": ("a.png", image, "image/png")},
            data={"model": MODEL, "response_format": "b64_json"},
            timeout=60,
        )

    first, other = send(CLIENT), send(NAMED)
    assert first.status_code == other.status_code == 200
    assert "idempotent-replayed" not in other.headers  # its own request, run for it


def test_no_secret_appears_in_responses_logs_or_metrics(
    guarded: GatewayProcess, emulators: tuple[Emulator, Emulator]
) -> None:
    fal, _ = emulators
    fal.faults(error_rate=1, error_status=401)  # provider auth failures are logged
    seen: list[bytes] = []
    for headers in (bearer(CLIENT), bearer(NAMED), bearer("sk-wrong"), {}, bearer(ADMIN)):
        answer = httpx.post(
            f"{guarded.url}/v1/images/edits",
            headers=headers,
            files={"image": ("a.png", make_image(40, 44), "image/png")},
            data={"model": MODEL},
            timeout=60,
        )
        seen += [answer.content, str(answer.headers).encode()]
    for route, headers in (
        ("/admin/providers", bearer(ADMIN)),
        ("/admin/spend", bearer(ADMIN)),
        ("/status.json", bearer(ADMIN)),
        ("/readyz", {}),
        ("/v1/usage", bearer(CLIENT)),
        ("/v1/models", bearer(CLIENT)),
    ):
        answer = httpx.get(f"{guarded.url}{route}", headers=headers)
        assert answer.status_code == 200, route
        seen += [answer.content, str(answer.headers).encode()]
    seen.append(httpx.get(f"{guarded.url}/metrics").content)
    seen.append(guarded.log_path.read_bytes())
    for blob in seen:
        for secret in SECRETS:
            assert secret.encode() not in blob, secret


def test_non_ascii_in_parameters_and_credentials_is_a_4xx(guarded: GatewayProcess) -> None:
    # Each was a 500: str.isdigit accepts '²', which int() refuses; hmac.compare_digest and
    # base64 refuse non-ASCII str with exceptions nothing caught.
    admin = {"Authorization": f"Bearer {ADMIN}"}
    probes: list[tuple[str, dict[str, Any], int]] = [
        (f"{guarded.url}/v1/files/img_x.png/content?expires=%C2%B2&signature=a", {}, 400),
        (f"{guarded.url}/v1/files/img_x.png/content?expires=9999999999&signature=%C3%A9", {}, 401),
        (f"{guarded.url}/v1/usage?days=%C2%B2", {"Authorization": f"Bearer {CLIENT}"}, 400),
        (f"{guarded.url}/admin/spend?days=%C2%B2", admin, 400),
        (f"{guarded.url}/status.json", {"Authorization": b"Basic \xe9"}, 401),
    ]
    for url, headers, status in probes:
        answer = httpx.get(url, headers=headers)
        assert answer.status_code == status, (url, answer.status_code, answer.text)
        assert answer.json()["error"]["message"], url
