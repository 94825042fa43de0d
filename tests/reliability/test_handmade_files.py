"""Hand-made bad files for POST /v1/images/edits on a real gateway process: decompression
bombs, truncated and polyglot files, and content types that lie. Each answer must be a 4xx
in OpenAI's envelope (or a clean 200 for input that is valid after all), with the same
per-case health and memory check as the other hand-made cases."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.integration.servers import GatewayProcess
from tests.reliability import harness
from tests.reliability.forms import Part, text, valid_parts
from tests.reliability.handmade import error, form, post, still_healthy
from tests.reliability.harness import MODEL
from tests.reliability.images import POLYGLOT_PAYLOADS, bombs, polyglots, tiny, truncations

PNG = tiny("PNG")
__all__ = ["still_healthy"]  # the autouse check, applied here too


@pytest.mark.parametrize("case", sorted(bombs()))
def test_decompression_bomb(
    case: str, http: httpx.Client, gateway: GatewayProcess, artifacts: Path
) -> None:
    before = harness.reset_peak(gateway)
    response = post(http, gateway, form(valid_parts(bombs()[case], scale_factor="2")), artifacts)
    assert response.status_code in (400, 413, 415), response.text
    assert error(response)["param"] == "image"
    growth = gateway.peak_rss_kib() - before
    # Refused from the header: no pixel buffer of the declared size is ever allocated.
    assert growth < 80 * 1024, f"peak RSS grew {growth} KiB on {case}"


@pytest.mark.parametrize("case", sorted(truncations()))
def test_truncated_file(
    case: str, http: httpx.Client, gateway: GatewayProcess, artifacts: Path
) -> None:
    """Cut anywhere: refused naming the image, or (cut only in the last bytes, which
    lenient decoders do without) read; never a 5xx. `size=1x1` is refused once the image
    has been read, so the providers stay out of it."""
    data = truncations()[case]
    response = post(http, gateway, form(valid_parts(data, size="1x1")), artifacts)
    assert 400 <= response.status_code < 500, response.text
    if len(data) <= 32:
        assert error(response)["param"] == "image", response.text
    else:  # refused for the image, or read and then refused for the size
        assert error(response)["param"] in ("image", "size"), response.text


@pytest.mark.parametrize("case", sorted(polyglots()))
def test_polyglot_file(
    case: str, http: httpx.Client, gateway: GatewayProcess, artifacts: Path
) -> None:
    """Refused, or upscaled into a clean image that carries none of the smuggled payload."""
    data = polyglots()[case]
    sent = form(valid_parts(data, response_format="b64_json", output_format="png"))
    response = post(http, gateway, sent, artifacts)
    if response.status_code != 200:
        assert error(response)["param"] == "image"
        return
    out = base64.b64decode(response.json()["data"][0]["b64_json"])
    Image.open(io.BytesIO(out)).load()
    for payload in POLYGLOT_PAYLOADS:
        assert payload not in out


@pytest.mark.parametrize(
    "ctype", [b"text/html", b"application/zip", b"image/svg+xml", b"", b"image/gif"]
)
def test_content_type_lies(
    ctype: bytes, http: httpx.Client, gateway: GatewayProcess, artifacts: Path
) -> None:
    """The type comes from the bytes: a PNG declared as anything is still a PNG, and HTML
    declared as a PNG is still not an image."""
    parts = [text("model", MODEL), Part(b"image", PNG, b"x.html", ctype or None)]
    assert post(http, gateway, form(parts), artifacts).status_code == 200
    parts = [text("model", MODEL), Part(b"image", b"<html></html>", b"x.png", b"image/png")]
    assert post(http, gateway, form(parts), artifacts).status_code == 415
