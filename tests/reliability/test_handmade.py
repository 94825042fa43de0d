"""Hand-made bad input for POST /v1/images/edits on a real gateway process: malformed
multipart, HTTP framing lies, a body that never ends, a 2 GB declared length, JSON of the
wrong types, extreme numbers and unicode in every field (bad files are in
test_handmade_files.py). Each answer must be a 4xx in OpenAI's envelope (or a 200 for input that is
valid after all), the process must keep answering /healthz, and its peak RSS must stay
within a budget over its warmed-up baseline."""

from __future__ import annotations

import base64
import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.integration.servers import GatewayProcess
from tests.reliability import harness
from tests.reliability.forms import (
    KNOWN,
    UNICODE,
    Part,
    image_part,
    multipart,
    text,
    valid_parts,
)
from tests.reliability.handmade import error, form, post, still_healthy
from tests.reliability.harness import EDITS, MODEL, RawAnswer, Sent, Violations
from tests.reliability.images import tiny

PNG = tiny("PNG")
JSON = ((b"Content-Type", b"application/json"),)
__all__ = ["still_healthy"]  # the autouse check, applied here too


# -- malformed multipart --------------------------------------------------------------------

GOOD_FORM = multipart(valid_parts(PNG, scale_factor="2"))
MALFORMED: dict[str, tuple[bytes, bytes]] = {
    "no-boundary-param": (b"multipart/form-data", GOOD_FORM),
    "empty-boundary": (b"multipart/form-data; boundary=", GOOD_FORM),
    "boundary-mismatch": (b"multipart/form-data; boundary=other", GOOD_FORM),
    "boundary-quoted-mismatch": (b'multipart/form-data; boundary="gw-boundary "', GOOD_FORM),
    "missing-closing-boundary": (
        b"multipart/form-data; boundary=gw-boundary",
        GOOD_FORM[: GOOD_FORM.rindex(b"--gw-boundary--")],
    ),
    "cut-inside-image": (b"multipart/form-data; boundary=gw-boundary", GOOD_FORM[:-200]),
    "lf-only": (b"multipart/form-data; boundary=gw-boundary", GOOD_FORM.replace(b"\r\n", b"\n")),
    "preamble-only": (b"multipart/form-data; boundary=gw-boundary", b"just some text"),
    "empty-body": (b"multipart/form-data; boundary=gw-boundary", b""),
    "closing-only": (b"multipart/form-data; boundary=gw-boundary", b"--gw-boundary--\r\n"),
    "charset-undefined": (
        b"multipart/form-data; boundary=gw-boundary; charset=undefined",
        GOOD_FORM,
    ),
    "charset-punycode": (b"multipart/form-data; boundary=gw-boundary; charset=punycode", GOOD_FORM),
    "multipart-mixed": (b"multipart/mixed; boundary=gw-boundary", GOOD_FORM),
    "part-without-name": (
        b"multipart/form-data; boundary=gw-boundary",
        multipart([Part(None, b"x"), *valid_parts(PNG)]),
    ),
    "header-without-colon": (
        b"multipart/form-data; boundary=gw-boundary",
        multipart([Part(b"model", MODEL.encode(), extra_headers=b"garbage\r\n"), image_part(PNG)]),
    ),
    "five-files": (
        b"multipart/form-data; boundary=gw-boundary",
        multipart([image_part(PNG, filename=b"%d" % i) for i in range(5)]),
    ),
    "two-images": (
        b"multipart/form-data; boundary=gw-boundary",
        multipart([*valid_parts(PNG), image_part(PNG, b"image[]")]),
    ),
    "no-image": (b"multipart/form-data; boundary=gw-boundary", multipart([text("model", MODEL)])),
    "201-fields": (
        b"multipart/form-data; boundary=gw-boundary",
        multipart([*valid_parts(PNG), *[text("x", "1")] * 201]),
    ),
    "70KB-field": (
        b"multipart/form-data; boundary=gw-boundary",
        multipart([*valid_parts(PNG), text("user", "u" * 70_000)]),
    ),
    "image-base64-transfer-encoding": (
        b"multipart/form-data; boundary=gw-boundary",
        multipart(
            [
                text("model", MODEL),
                Part(
                    b"image",
                    base64.b64encode(PNG),
                    b"x.png",
                    b"image/png",
                    b"Content-Transfer-Encoding: base64\r\n",
                ),
            ]
        ),
    ),
    "nested-brackets-conflict": (
        b"multipart/form-data; boundary=gw-boundary",
        multipart(
            [*valid_parts(PNG), text("provider[order][]", "fal"), text("provider[order][x]", "y")]
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_multipart(
    case: str, http: httpx.Client, gateway: GatewayProcess, artifacts: Path
) -> None:
    ctype, body = MALFORMED[case]
    response = post(http, gateway, Sent(((b"Content-Type", ctype),), body), artifacts)
    assert 400 <= response.status_code < 500, response.text


# -- HTTP framing: refused by uvicorn before the app sees the request -------------------------

FRAMING: dict[str, bytes] = {
    "content-length-not-a-number": b"Content-Length: abc\r\n\r\n--gw",
    "content-length-negative": b"Content-Length: -5\r\n\r\n--gw",
    "content-length-10^23": b"Content-Length: 100000000000000000000000\r\n\r\n--gw",
    "content-length-twice": b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n--gw--",
    "chunk-size-not-hex": b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "chunked-and-length": b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n3\r\nabc\r\n",
}


@pytest.mark.parametrize("case", sorted(FRAMING))
def test_http_framing_lies(case: str, gateway: GatewayProcess) -> None:
    """Answered at once with a 4xx, or the connection closed; never a 5xx or a hang. uvicorn
    answers these itself, in text/plain: the envelope is the app's, and it never runs."""
    harness.TRIED["handmade"] += 1
    head = (
        f"POST {EDITS} HTTP/1.1\r\nHost: gateway\r\n"
        "Content-Type: multipart/form-data; boundary=gw\r\n"
    ).encode()
    answer = harness.raw_exchange(gateway, head + FRAMING[case], wait_s=5)
    assert answer.status is None or 400 <= answer.status < 500, answer
    assert answer.status is not None or answer.closed, answer
    assert answer.seconds < 5, answer


# -- lengths: declared 2 GB, a body that never ends -----------------------------------------


def test_declared_2gb_with_small_body(gateway: GatewayProcess) -> None:
    """Refused from the header in OpenAI's envelope without waiting for the 2 GB."""
    harness.TRIED["handmade"] += 1
    head = (
        f"POST {EDITS} HTTP/1.1\r\nHost: gateway\r\n"
        "Content-Type: multipart/form-data; boundary=gw-boundary\r\n"
        "Content-Length: 2147483648\r\n\r\n"
    ).encode()
    answer = harness.raw_exchange(gateway, head + GOOD_FORM, wait_s=10)
    assert answer.status == 413, answer
    assert answer.seconds < 2, answer
    assert answer.headers.get("content-type") == "application/json"
    assert answer.headers.get("x-request-id")
    assert not harness.envelope_problems(answer.body), answer.body
    assert error_of(answer)["code"] == "payload_too_large"


def error_of(answer: RawAnswer) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(answer.body)["error"]
    return body


def _stalled_head(content_type: str, declared: int) -> bytes:
    return (
        f"POST {EDITS} HTTP/1.1\r\nHost: gateway\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    ).encode()


def test_body_that_never_ends_is_bounded(stall_probe: harness.StallProbe) -> None:
    """Clients that send their headers and part of the body (or none), then nothing. The
    gateway must answer (408/400) or close within RELIABILITY_STALL_BOUND_S, and answer
    others meanwhile. The requests hang from the session's start (conftest.stall_probe)."""
    assert stall_probe.healthz_s is not None and stall_probe.healthz_s < 1, (
        f"/healthz took {stall_probe.healthz_s} s while bodies were stalled"
    )
    for name, answer in stall_probe.results().items():
        waited = f"{name}: {answer.seconds:.1f} s, status {answer.status}, closed {answer.closed}"
        assert answer.status is not None or answer.closed, (
            f"no answer and no close within {harness.STALL_BOUND_S:g} s ({waited})"
        )
        assert answer.seconds <= harness.STALL_BOUND_S, waited
        if answer.status is not None:
            assert 400 <= answer.status < 500, waited


def test_many_stalled_bodies_do_not_stop_service(
    http: httpx.Client,
    gateway: GatewayProcess,
) -> None:
    """64 connections stuck mid-body: a real request is still upscaled promptly."""
    host, port = gateway.url.removeprefix("http://").split(":")
    head = _stalled_head("multipart/form-data; boundary=gw-boundary", 100_000)
    socks = []
    try:
        for _ in range(64):
            sock = socket.create_connection((host, int(port)), timeout=5)
            sock.sendall(head + GOOD_FORM[:300])
            socks.append(sock)
        harness.TRIED["handmade"] += len(socks)
        started = time.monotonic()
        response = http.post(
            f"{gateway.url}{EDITS}", content=GOOD_FORM, headers=list(harness.multipart_headers())
        )
        assert response.status_code == 200, response.text
        assert time.monotonic() - started < 10
    finally:
        for sock in socks:
            sock.close()


# -- JSON bodies of the wrong shape -----------------------------------------------------------

DATA_URI = "data:image/png;base64," + base64.b64encode(PNG).decode()
JSON_CASES: dict[str, bytes] = {
    "image-number": json.dumps({"image": 5}).encode(),
    "image-null": json.dumps({"image": None}).encode(),
    "image-object-no-url": json.dumps({"image": {"x": 1}}).encode(),
    "image-url-number": json.dumps({"image": {"image_url": 5}}).encode(),
    "images-empty": json.dumps({"images": []}).encode(),
    "images-two": json.dumps({"images": [{"url": DATA_URI}, {"url": DATA_URI}]}).encode(),
    "image-and-images": json.dumps({"image": DATA_URI, "images": [DATA_URI]}).encode(),
    "n-true": json.dumps({"image": DATA_URI, "n": True}).encode(),
    "n-1e308": json.dumps({"image": DATA_URI, "n": 1e308}).encode(),
    "n-2^64": json.dumps({"image": DATA_URI, "n": 2**64}).encode(),
    "n-10^400": b'{"image": "' + DATA_URI.encode() + b'", "n": 1' + b"0" * 400 + b"}",
    "n-NaN": b'{"image": "' + DATA_URI.encode() + b'", "n": NaN}',
    "scale-list": json.dumps({"image": DATA_URI, "scale_factor": [2]}).encode(),
    "scale-object": json.dumps({"image": DATA_URI, "scale_factor": {"a": 1}}).encode(),
    "scale-string-2": json.dumps({"image": DATA_URI, "scale_factor": "2"}).encode(),
    "size-number": json.dumps({"image": DATA_URI, "size": 512}).encode(),
    "model-list": json.dumps({"image": DATA_URI, "model": [MODEL]}).encode(),
    "provider-string": json.dumps({"image": DATA_URI, "provider": "fal"}).encode(),
    "provider-order-number": json.dumps({"image": DATA_URI, "provider": {"order": 5}}).encode(),
    "provider-max-price-nan": json.dumps(
        {"image": DATA_URI, "provider": {"max_price": "NaN"}}
    ).encode(),
    "provider-unknown-key": json.dumps({"image": DATA_URI, "provider": {"x": 1}}).encode(),
    "top-level-list": json.dumps([{"image": DATA_URI}]).encode(),
    "top-level-string": b'"image"',
    "top-level-number": b"1e999",
    "nested-100000-deep": b"[" * 100_000 + b"]" * 100_000,
    "object-100000-deep": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "duplicate-keys": b'{"image": 1, "image": "' + DATA_URI.encode() + b'", "n": "x", "n": 1}',
    "utf-16": json.dumps({"image": DATA_URI}).encode("utf-16"),
    "bom": b"\xef\xbb\xbf" + json.dumps({"image": DATA_URI}).encode(),
    "truncated": json.dumps({"image": DATA_URI})[:-5].encode(),
    "lone-surrogate": b'{"image": "' + DATA_URI.encode() + b'", "user": "\\ud800"}',
    "data-uri-not-base64": json.dumps({"image": "data:image/png,rawbytes"}).encode(),
    "data-uri-bad-base64": json.dumps({"image": "data:image/png;base64,!!!"}).encode(),
    "data-uri-unicode": json.dumps({"image": "data:image/png;base64,\u00e9\u00e9"}).encode(),
    "url-ftp": json.dumps({"image": "ftp://127.0.0.1/x.png"}).encode(),
    "url-loopback": json.dumps({"image": "https://127.0.0.1/x.png"}).encode(),
    # urlsplit() itself refuses these: the gateway must answer 400, not 500.
    "url-bad-ipv6": json.dumps({"image": "https://[::1/x.png"}).encode(),
    "url-port-out-of-range": json.dumps({"image": "https://127.0.0.1:99999/x.png"}).encode(),
    "url-port-not-a-number": json.dumps({"image": "https://127.0.0.1:abc/x.png"}).encode(),
}


@pytest.mark.parametrize("case", sorted(JSON_CASES))
def test_json_wrong_types(
    case: str, http: httpx.Client, gateway: GatewayProcess, artifacts: Path
) -> None:
    response = post(http, gateway, Sent(JSON, JSON_CASES[case]), artifacts)
    if case == "duplicate-keys":  # valid: the last key wins
        assert response.status_code == 200, response.text
    elif case == "scale-string-2":  # JSON's numbers are JSON's own, as /openapi.json says
        assert response.status_code == 400 and error(response)["param"] == "scale_factor"
    else:
        assert 400 <= response.status_code < 500, response.text


def test_image_url_in_multipart_text_part(
    http: httpx.Client, gateway: GatewayProcess, artifacts: Path
) -> None:
    """The multipart twin of the bad URLs above: `-F image=https://[::1`."""
    for ref in ("https://[::1/x.png", "https://127.0.0.1:99999/", "https://h:abc/"):
        response = post(http, gateway, form([text("model", MODEL), text("image", ref)]), artifacts)
        assert response.status_code == 400 and error(response)["param"] == "image"


# -- extreme numbers and unicode ------------------------------------------------------------

EXTREMES: list[tuple[str, str]] = [
    *[
        ("scale_factor", v)
        for v in ("1e308", "-1e308", "nan", "inf", "1e-320", "0", "4.0000001", "-0", "9" * 400)
    ],
    *[("n", v) for v in ("99999999999999999999", "-1", "0", "5", "1e3", "1.5", "9" * 5000)],
    # Integers past a float's range (int() takes up to 4300 digits): math.isfinite overflows.
    ("n", "1" + "0" * 400),
    ("output_compression", "9" * 400),
    *[
        ("size", v)
        for v in ("99999999x99999999", "0x0", "16384x16384", "16385x1", "1x1", "-5x-5", "1e3x1e3")
    ],
    *[("output_compression", v) for v in ("-1", "101", "1e9", "50.5")],
]


@pytest.mark.parametrize(("field", "value"), EXTREMES)
def test_extreme_numbers(
    field: str, value: str, http: httpx.Client, gateway: GatewayProcess, artifacts: Path
) -> None:
    response = post(http, gateway, form(valid_parts(PNG, **{field: value})), artifacts)
    assert response.status_code == 400, response.text
    assert error(response)["param"] == field


@pytest.mark.parametrize("field", [*KNOWN, "unknown_field", "image-filename", "field-name"])
def test_unicode_in_every_field(
    field: str, http: httpx.Client, gateway: GatewayProcess, artifacts: Path
) -> None:
    """Refused in the envelope or accepted. `size=1x1` (refused once every field has been
    parsed and the image read) keeps the providers out of it."""
    size = () if field == "size" else (text("size", "1x1"),)
    for value in (*UNICODE[:5], "名前", "🦄" * 256):
        raw = value.encode("utf-8")
        if field == "image-filename":
            parts = [text("model", MODEL), *size, Part(b"image", PNG, raw, b"image/png")]
        elif field == "field-name":
            parts = [*valid_parts(PNG), *size, Part(raw.replace(b'"', b"'"), b"1")]
        else:
            parts = [*valid_parts(PNG), *size, text(field, raw)]
        post(http, gateway, form(parts), artifacts)


@pytest.mark.parametrize(
    "key",
    ["é" * 10, "ÿ" * 300, "a b", "a\tb", "\x80\x81", "k" * 255, "😀".encode().decode("latin-1")],
)
def test_unicode_idempotency_key(
    key: str, http: httpx.Client, gateway: GatewayProcess, artifacts: Path
) -> None:
    headers = (*harness.multipart_headers(), (b"Idempotency-Key", key.encode("latin-1")))
    post(http, gateway, Sent(headers, GOOD_FORM), artifacts)


def test_violations_are_reported_not_swallowed() -> None:
    """The harness itself: a 500 without an envelope is recorded as a violation."""
    found = Violations()
    response = httpx.Response(500, content=b"boom", headers={"content-type": "text/plain"})
    dummy = GatewayProcess({}, Path("/nonexistent"))
    dummy.log = lambda: "ValueError: boom"  # type: ignore[method-assign]
    harness.check_answer(response, dummy, "self-test", Sent((), b""), found)
    signatures = set(found.found)
    assert "500 (ValueError: boom)" in signatures
    assert "error body is not JSON" in signatures
    assert "500 without x-request-id" in signatures
