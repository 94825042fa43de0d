"""Refusals that must cost the gateway no more memory than twice the image limit: an
oversized body (declared or chunked), a wrong type, a decompression bomb, too-large sides."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_image
from tests.integration.conftest import Emulator, own_gateway, write_config
from tests.integration.servers import GatewayProcess
from tests.unit.test_imaging import png_header_only

LIMIT = 10 * 1024 * 1024
MODEL = "recraft-crisp-upscale"


@pytest.fixture(scope="module")
def fresh_gateway(
    tmp_path_factory: pytest.TempPathFactory, fal_emulator: Emulator, replicate_emulator: Emulator
) -> Iterator[GatewayProcess]:
    with own_gateway(tmp_path_factory, fal_emulator, replicate_emulator) as process:
        yield process


def post_image(url: str, data: bytes, **fields: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/images/edits",
        files={"image": ("x.png", data, "image/png")},
        data={"model": MODEL, **fields},
        timeout=60,
    )


def raw_request(url: str, head: bytes, body_chunks: Iterator[bytes]) -> bytes:
    """Send a request on a raw socket and read the answer even if the server stops reading
    the body early (as it should)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def test_refusals_keep_memory_bounded(fresh_gateway: GatewayProcess, emulators: object) -> None:
    url = fresh_gateway.url
    assert post_image(url, make_image(64, 64), scale_factor="2").status_code == 200
    before = fresh_gateway.peak_rss_kib()

    # Declared too large: refused from the header, the body is never read.
    head = (
        b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
        b"boundary=b\r\nContent-Length: 104857600\r\n\r\n"
    )
    answer = raw_request(url, head, iter([b"\0" * 65536] * 64))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]

    # Chunked with no length (as Node streams send): refused once the limit is crossed.
    head = (
        b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
        b"boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    piece = os.urandom(1 << 20)
    first = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a"\r\n\r\n'
    chunks = [first] + [piece] * 40
    answer = raw_request(url, head, (b"%x\r\n%s\r\n" % (len(c), c) for c in chunks))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]

    # Just over the image limit inside an allowed body.
    assert post_image(url, b"\x89PNG\r\n\x1a\n" + os.urandom(LIMIT)).status_code == 413
    # Not an image (9 MB of noise).
    response = post_image(url, os.urandom(9 * 1024 * 1024))
    assert response.status_code == 415 and response.json()["error"]["param"] == "image"
    # A bomb: 60000x60000 declared in a few bytes.
    response = post_image(url, png_header_only(60000, 60000))
    assert response.status_code == 400 and response.json()["error"]["param"] == "image"
    # Sides out of range.
    response = post_image(url, png_header_only(5000, 40))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "image_dimensions_out_of_range"

    growth_kib = fresh_gateway.peak_rss_kib() - before
    assert growth_kib * 1024 < 2 * LIMIT, f"peak RSS grew {growth_kib} KiB"
    assert httpx.get(f"{url}/healthz").status_code == 200  # the worker survived all of it


def test_sandbox_readme_example(tmp_path: Path) -> None:
    """`make serve` with no credentials is sandbox mode; the README's SDK example must print
    the URL of an image of exactly the requested factor."""
    import re
    import subprocess
    import sys

    from tests.integration.servers import ROOT

    process = GatewayProcess(
        {"GATEWAY_CONFIG": str(write_config(tmp_path / "g.yaml"))}, tmp_path
    ).start()
    try:
        ready = httpx.get(f"{process.url}/readyz").json()
        assert ready["sandbox"] is True and all(p["emulated"] for p in ready["providers"])
        assert "SANDBOX MODE" in process.log()
        readme = (ROOT / "README.md").read_text()
        example = re.search(r"```python\n(.*?)```", readme, re.S)
        assert example, "README has no python example"
        env = {**os.environ, "GATEWAY_URL": f"{process.url}/v1", "PYTHONPATH": str(ROOT)}
        run = subprocess.run(
            [sys.executable, "-c", example[1]],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert run.returncode == 0, run.stderr
        printed = run.stdout.strip().splitlines()[-1]
        response = httpx.get(printed, timeout=10)
        from io import BytesIO

        from PIL import Image

        assert Image.open(BytesIO(response.content)).size == (600, 400)
    finally:
        process.stop()
