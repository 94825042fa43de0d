"""Hypothesis against POST /v1/images/edits on a real gateway process: generated multipart
fields, image bytes, multipart structure and JSON bodies. Every answer must be a 200 or a
4xx in OpenAI's envelope (JSON, with x-request-id); with healthy emulators a 5xx is always
a defect. Violations are collected, not raised, so one run counts every input it tried and
reports every distinct defect with the request that shows it.

RELIABILITY_EXAMPLES sets the examples per test (default 150: `make test` stays fast)."""

from __future__ import annotations

import base64
import functools
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.integration.servers import GatewayProcess
from tests.reliability import harness
from tests.reliability.forms import (
    KNOWN,
    VALID,
    Part,
    field_names,
    image_part,
    image_refs,
    junk_values,
    multipart,
    text,
    valid_parts,
    value_for,
)
from tests.reliability.harness import Header, Sent, Violations
from tests.reliability.images import POLYGLOT_PAYLOADS, any_image_bytes, polyglots, valid_images

FUZZ = settings(
    max_examples=harness.EXAMPLES,
    deadline=None,
    database=None,  # nothing written into the work tree; failures are reported, not replayed
    phases=(Phase.explicit, Phase.generate),  # violations are recorded, so nothing to shrink
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)


def _finish(found: Violations, gateway: GatewayProcess, baseline_kib: int, artifacts: Path) -> None:
    problems = harness.memory_problems(gateway, baseline_kib)
    if found:
        problems.append("bad input broke the contract:\n" + found.report(artifacts))
    assert not problems, "\n".join(problems)


# -- 1. the fields --------------------------------------------------------------------------

CONTENT_TYPES = (
    b"image/png",
    b"image/jpeg",
    b"text/html",
    b"application/octet-stream",
    b"image/svg+xml",
    b"",
    b"image/png; charset=utf-8",
    b"\xff\xfe",
)
FILENAMES = (
    b"in.png",
    b"upload",
    b"",
    b"../../etc/passwd",
    b"x.exe",
    "名前.png".encode(),
    b"\xff\xfe.png",
    b"a" * 4000,
    b'q"uote.png',
    b"semi;colon=1.png",
)
# Strategies are built once: building them inside a draw costs hypothesis a validation pass
# each time, which was most of the run.
VALID_IMAGE = st.sampled_from(valid_images())
SOME_IMAGE = VALID_IMAGE | any_image_bytes()
LIED_TYPE = st.sampled_from(CONTENT_TYPES) | st.none()
FILENAME = st.sampled_from(FILENAMES)
IMAGE_COUNT = st.integers(0, 2) | st.just(1) | st.just(1)


@functools.cache
def header_values() -> st.SearchStrategy[bytes]:
    # Any printable latin-1 (what HTTP allows in a field value), up to past the key limit.
    chars = st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")
    return st.text(chars, min_size=0, max_size=300).map(lambda s: s.encode("latin-1").strip())


@st.composite
def field_requests(draw: st.DrawFn) -> Sent:
    parts: list[Part] = []
    if draw(st.booleans()):
        parts.append(text("model", draw(value_for("model"))))
    for name in draw(st.lists(st.sampled_from(KNOWN), max_size=6)):
        parts.append(text(name, draw(value_for(name))))
    for _ in range(draw(st.integers(0, 3))):
        parts.append(text(draw(field_names()), draw(junk_values())))
    images = draw(IMAGE_COUNT)
    for _ in range(images):
        kind = draw(st.sampled_from(("file", "file", "file", "text")))
        name = draw(st.sampled_from((b"image", b"image", b"image[]")))
        if kind == "text":  # an image named by reference, or junk in its place
            parts.append(Part(name, draw(image_refs(VALID_IMAGE)).encode()))
            continue
        parts.append(Part(name, draw(SOME_IMAGE), draw(FILENAME), draw(LIED_TYPE)))
    parts = draw(st.permutations(parts))
    headers: list[Header] = list(harness.multipart_headers())
    if draw(st.integers(0, 4)) == 0:
        headers.append((b"Idempotency-Key", draw(header_values())))
    if draw(st.integers(0, 6)) == 0:
        headers.append((b"Authorization", draw(header_values())))
    return Sent(tuple(headers), multipart(parts))


# -- 2. the image bytes ---------------------------------------------------------------------


IMAGE_OR_POLYGLOT = any_image_bytes() | st.sampled_from(list(polyglots().values()))


@st.composite
def image_requests(draw: st.DrawFn) -> Sent:
    data = draw(IMAGE_OR_POLYGLOT)
    fields = {"response_format": "b64_json"}
    fields.update(draw(st.sampled_from(({}, {"scale_factor": "2"}, {"size": "1x1"}))))
    parts = valid_parts(data, **fields)
    parts[-1] = Part(b"image", data, draw(FILENAME), draw(LIED_TYPE))
    return Sent(harness.multipart_headers(), multipart(parts))


def _check_output(response: httpx.Response | None, sent: Sent, found: Violations) -> None:
    """A 200 carries a clean image: it decodes, and no polyglot payload rode along."""
    if response is None or response.status_code != 200:
        return
    for item in response.json()["data"]:
        out = base64.b64decode(item["b64_json"])
        for payload in POLYGLOT_PAYLOADS:
            if payload in out and payload in sent.body:
                found.add("image", f"output carries {payload!r}", "", sent.wire())
        try:
            Image.open(io.BytesIO(out)).load()
        except Exception as exc:
            found.add("image", f"output does not decode: {exc}"[:120], "", sent.wire())


# -- 3. the multipart structure -------------------------------------------------------------

CHARSETS = (b"utf-8", b"utf-16", b"latin-1", b"undefined", b"punycode", b"idna", b"x-nope", b"")
BOUNDARIES = (b"gw-boundary", b"other", b"", b'"gw-boundary"', b"gw boundary", b"a" * 200)


@st.composite
def structure_requests(draw: st.DrawFn) -> Sent:
    parts = valid_parts(draw(VALID_IMAGE), scale_factor="2")
    extra = draw(
        st.sampled_from(
            (
                b"",
                b"Content-Transfer-Encoding: base64\r\n",
                b"Content-Type: multipart/mixed; boundary=inner\r\n",
                b"no colon here\r\n",
                b"X-Long: " + b"h" * 70_000 + b"\r\n",
                b"Content-Disposition: attachment\r\n",
                b": empty name\r\n",
            )
        )
    )
    if extra:
        at = draw(st.integers(0, len(parts) - 1))
        p = parts[at]
        parts[at] = Part(p.name, p.body, p.filename, p.content_type, extra)
    if draw(st.integers(0, 5)) == 0:  # a part with no name, or too many parts
        parts += draw(
            st.sampled_from(
                (
                    [Part(None, b"x")],
                    [Part(b"f", b"1")] * 250,
                    [image_part(valid_images()[0], filename=b"%d" % i) for i in range(5)],
                    [Part(b"name*=UTF-8''%E2%82%AC", b"1")],
                )
            )
        )
    body = multipart(parts)
    mutation = draw(
        st.sampled_from(("none", "cut", "delete", "insert", "lf", "no-close", "dup", "prefix"))
    )
    if mutation == "cut":
        body = body[: draw(st.integers(0, len(body)))]
    elif mutation == "delete":
        a = draw(st.integers(0, len(body)))
        body = body[:a] + body[a + draw(st.integers(1, 64)) :]
    elif mutation == "insert":
        a = draw(st.integers(0, len(body)))
        body = body[:a] + draw(st.binary(min_size=1, max_size=64)) + body[a:]
    elif mutation == "lf":
        body = body.replace(b"\r\n", b"\n")
    elif mutation == "no-close":
        body = body[: body.rindex(b"--gw-boundary--")]
    elif mutation == "dup":
        body = body + body
    elif mutation == "prefix":
        body = draw(st.binary(max_size=64)) + body
    ctype = b"multipart/form-data; boundary=" + draw(st.sampled_from(BOUNDARIES))
    if draw(st.booleans()):
        ctype += b"; charset=" + draw(st.sampled_from(CHARSETS))
    ctype = draw(
        st.sampled_from(
            (
                ctype,
                ctype,
                ctype,
                b"multipart/form-data",
                b"multipart/form-data; boundary",
                b"multipart/mixed; boundary=gw-boundary",
                b"MULTIPART/FORM-DATA; BOUNDARY=gw-boundary",
                b"multipart/form-data;boundary=gw-boundary;boundary=x",
            )
        )
    )
    return Sent(((b"Content-Type", ctype),), body, chunked=draw(st.integers(0, 3)) == 0)


# -- 4. JSON bodies -------------------------------------------------------------------------

JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),  # NaN and Infinity become bare NaN / Infinity: invalid JSON
    st.text(max_size=30),
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
JSON_TYPES = (
    b"application/json",
    b"application/json; charset=utf-8",
    b"application/vnd.api+json",
    b"APPLICATION/JSON",
    b"",
    b"text/plain",
    b"application/x-www-form-urlencoded",
    b"multipart/form-data; boundary=gw-boundary",
)


JSON_IMAGE = st.one_of(
    image_refs(SOME_IMAGE),
    JSON_VALUES,
    st.builds(lambda r: {"image_url": r}, image_refs(SOME_IMAGE)),
    st.builds(lambda r: [{"url": r}], image_refs(SOME_IMAGE)),
)
JSON_PROVIDER = (
    st.dictionaries(
        st.sampled_from(("order", "only", "ignore", "sort", "max_price", "allow_fallbacks", "x")),
        JSON_VALUES | st.sampled_from(("fal", "replicate", ["fal"])),
    )
    | JSON_VALUES
)
JSON_FIELD = {
    name: st.sampled_from(VALID[name]) | JSON_VALUES | st.sampled_from(VALID[name])
    for name in VALID
}


@st.composite
def json_requests(draw: st.DrawFn) -> Sent:
    body: dict[str, Any] = {}
    if draw(st.integers(0, 3)) > 0:
        body["model"] = draw(JSON_FIELD["model"])
    image = draw(JSON_IMAGE)
    body[draw(st.sampled_from(("image", "image", "images")))] = image
    for name in draw(st.lists(st.sampled_from((*KNOWN, "provider")), max_size=5)):
        if name.startswith("provider"):
            body["provider"] = draw(JSON_PROVIDER)
        else:
            body[name] = draw(JSON_FIELD[name])
    for key in draw(st.lists(st.text(max_size=12), max_size=2)):
        body[key] = draw(JSON_VALUES)
    top: Any = draw(st.sampled_from(("object",) * 6 + ("list", "string", "null", "number")))
    payload: Any = {"list": [body], "string": "x", "null": None, "number": 1}.get(top, body)
    raw = json.dumps(payload).encode()
    encoding = draw(st.sampled_from(("plain",) * 8 + ("cut", "bom", "utf-16", "garbage")))
    if encoding == "cut":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif encoding == "bom":
        raw = b"\xef\xbb\xbf" + raw
    elif encoding == "utf-16":
        raw = json.dumps(payload).encode("utf-16")
    elif encoding == "garbage":
        raw = draw(st.binary(max_size=128))
    ctype = draw(st.sampled_from(JSON_TYPES))
    headers = ((b"Content-Type", ctype),) if ctype else ()
    return Sent(headers, raw)


# generator name -> (strategy, what to check beyond the harness's contract)
Check = Callable[[httpx.Response | None, Sent, Violations], None]
GENERATORS: dict[str, tuple[Callable[[], Any], Check | None]] = {
    "fields": (field_requests, None),
    "image": (image_requests, _check_output),
    "multipart": (structure_requests, None),
    "json": (json_requests, None),
}


@pytest.mark.parametrize("generator", list(GENERATORS))
def test_generated_inputs(
    generator: str,
    http: httpx.Client,
    gateway: GatewayProcess,
    emulators: object,
    baseline_kib: int,
    artifacts: Path,
) -> None:
    strategy, check = GENERATORS[generator]
    found = harness.new_violations()

    @FUZZ
    @given(sent=strategy())
    def fuzz(sent: Sent) -> None:
        answer = harness.send(http, gateway, generator, sent, found)
        if check is not None:
            check(answer, sent, found)

    fuzz()
    _finish(found, gateway, baseline_kib, artifacts)


def test_valid_request_still_served(
    http: httpx.Client, gateway: GatewayProcess, emulators: object
) -> None:
    """After all the above, the same process still upscales (no worker stuck or poisoned)."""
    body = multipart(valid_parts(valid_images()[0], scale_factor="2"))
    response = http.post(
        f"{gateway.url}{harness.EDITS}", content=body, headers=list(harness.multipart_headers())
    )
    assert response.status_code == 200, response.text
    assert orjson.loads(response.content)["size"] == "80x80"
