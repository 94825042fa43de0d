"""Multipart bodies built byte by byte (so any name, value, filename or content type can be
sent, including ones no client library would produce), and strategies for the edit
endpoint's fields: valid values, and junk of every kind."""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass

from hypothesis import strategies as st

from tests.reliability.harness import MODEL

BOUNDARY = b"gw-boundary"


@dataclass(frozen=True, slots=True)
class Part:
    name: bytes | None  # None: a Content-Disposition without name=
    body: bytes
    filename: bytes | None = None
    content_type: bytes | None = None
    extra_headers: bytes = b""  # raw header lines, each ending in CRLF

    def encode(self) -> bytes:
        disposition = b"form-data"
        if self.name is not None:
            disposition += b'; name="' + self.name + b'"'
        if self.filename is not None:
            disposition += b'; filename="' + self.filename + b'"'
        head = b"Content-Disposition: " + disposition + b"\r\n"
        if self.content_type is not None:
            head += b"Content-Type: " + self.content_type + b"\r\n"
        return head + self.extra_headers + b"\r\n" + self.body


def multipart(parts: list[Part], boundary: bytes = BOUNDARY) -> bytes:
    out = b"".join(b"--" + boundary + b"\r\n" + p.encode() + b"\r\n" for p in parts)
    return out + b"--" + boundary + b"--\r\n"


def text(name: str, value: str | bytes) -> Part:
    return Part(name.encode(), value.encode() if isinstance(value, str) else value)


def image_part(data: bytes, name: bytes = b"image", filename: bytes = b"in.png") -> Part:
    return Part(name, data, filename, b"image/png")


def valid_parts(image: bytes, **fields: str) -> list[Part]:
    return [text("model", MODEL), *(text(k, v) for k, v in fields.items()), image_part(image)]


# -- field names and values ------------------------------------------------------------------

VALID: dict[str, tuple[str, ...]] = {
    "model": (MODEL, "recraft/crisp-upscale", "fal-ai/recraft/upscale/crisp"),
    "scale_factor": ("1", "2", "1.5", "4", " 3 "),
    "size": ("auto", "256x256", "100X200", "AUTO"),
    "n": ("1", "2"),
    "response_format": ("url", "b64_json"),
    "output_format": ("png", "jpeg", "jpg", "webp", "avif", "gif", "PNG"),
    "output_compression": ("0", "50", "100"),
    "enable_safety_checker": ("true", "false", "1", "no"),
    "sync_mode": ("true", "false", "on", "off"),
    "user": ("user-1", "ü" * 256),
    "prompt": ("upscale", ""),
    "cache": ("true", "false"),
    "provider[order][]": ("fal", "replicate"),
    "provider[only][]": ("fal", "replicate"),
    "provider[ignore][]": ("replicate",),
    "provider[sort]": ("price", "latency", "balanced", "ordered"),
    "provider[max_price]": ("0.01", "1"),
    "provider[allow_fallbacks]": ("true", "false"),
    "provider[hedge]": ("false",),
    "provider[only]": ("fal,replicate",),
}
KNOWN = tuple(VALID)
ODD_NAMES = (
    "provider",
    "provider[]",
    "provider[unknown]",
    "provider[order][x][y]",
    "provider[only][0]",
    "provider[order][][x]",
    "provider[max_price][]",
    "provider[sort][]",
    "model[]",
    "n[x]",
    "scale_factor[]",
    "image[x]",
    "images",
    "a[b][c][d][e]",
    "[]",
    "]",
    "[",
    "a]b",
    "",
    "\u202emodel",
    "\uff4d\uff4f\uff44\uff45\uff4c",  # fullwidth "model"
    "n\x00",
    "🦄",
)
NUMBERS = (
    "NaN",
    "nan",
    "-inf",
    "Infinity",
    "1e309",
    "-1e309",
    "1e-400",
    "0x10",
    "1_000",
    "\u0663",  # Arabic-Indic three
    "\uff14",  # fullwidth four
    "²",
    "-0",
    "+2",
    "4.0000000001",
    "0.9999999999",
    "2\n",
    "1.0",
    "9" * 5000,
    "1" + "0" * 400,
    "-" + "9" * 30,
    "16385x16385",
    "0x0",
    "1x1",
    "\u0661\u0660\u0660x\u0661\u0660\u0660",  # Arabic-Indic 100x100
    "4096x4096",
    "99999x99999",
    "-1x-1",
    "1x",
    "x1",
    "2.5x2.5",
)
UNICODE = (
    "\u0000",
    "\u202e\u202d",
    "\ufeff",
    "🦄" * 40,
    "Z̵̡̛̜͓̟̀a̶l̴g̷o̸",
    "ǅ",
    "ß",
    "İ",
    "\u2028\u2029",
    "\ud7ff\ue000\uffff",
    "名前",
    "' OR 1=1 --",
    "${jndi:ldap://127.0.0.1/x}",
    "{{7*7}}",
    "%s%s%n",
    "../../../../etc/passwd",
)


@functools.cache
def long_strings() -> st.SearchStrategy[str]:
    return st.builds(
        lambda c, n: c * n,
        st.sampled_from(("9", "a", "é", "🦄", "\x00", "x[")),
        st.integers(256, 70_000),
    )


@functools.cache
def numbers() -> st.SearchStrategy[str]:
    return st.one_of(
        st.integers(-(2**80), 2**80).map(str),
        st.floats().map(repr),
        st.floats(allow_nan=False, allow_infinity=False).map(lambda f: f"{f:.30g}"),
        st.sampled_from(NUMBERS),
    )


@functools.cache
def junk_values() -> st.SearchStrategy[str | bytes]:
    return st.one_of(
        st.text(max_size=40),
        st.binary(max_size=40),  # invalid UTF-8 on the wire
        numbers(),
        st.sampled_from(UNICODE),
        long_strings(),
        st.just(""),
        st.sampled_from([v for vs in VALID.values() for v in vs]),  # right value, wrong field
    )


@functools.cache
def value_for(name: str) -> st.SearchStrategy[str | bytes]:
    valid = VALID.get(name)
    if valid is None:
        return junk_values()
    return st.one_of(st.sampled_from(valid), junk_values())


@functools.cache
def field_names() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(KNOWN), st.sampled_from(ODD_NAMES), st.text(max_size=20))


# -- image references (JSON bodies and text parts): never a name that needs DNS --------------

HOSTS = (
    "127.0.0.1",
    "127.1",
    "2130706433",
    "0x7f000001",
    "0.0.0.0",
    "localhost",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "[::]",
    "[::1",
    "[fe80::1%25lo]",
    "169.254.169.254",
    "10.0.0.1",
    "[",
    "]",
    "",
    "user:pass@127.0.0.1",
    "127.0.0.1\\@127.0.0.2",
)
SCHEMES = ("https://", "http://", "HTTPS://", "ftp://", "file://", "https:/", "https:", "//", "")


@functools.cache
def ports() -> st.SearchStrategy[str]:
    return st.one_of(
        st.just(""),
        st.integers(-10, 200_000).map(lambda p: f":{p}"),
        st.sampled_from((":", ":abc", ":-1", ":+1", ": 80", ":0x50", ":\u0668\u0660")),
    )


@functools.cache
def image_urls() -> st.SearchStrategy[str]:
    return st.builds(
        lambda s, h, p, path: f"{s}{h}{p}{path}",
        st.sampled_from(SCHEMES),
        st.sampled_from(HOSTS),
        ports(),
        st.sampled_from(("/x.png", "", "/", "/%00", "/" + "a" * 3000, "?q=1#f")),
    )


@functools.cache
def data_uris(image: st.SearchStrategy[bytes]) -> st.SearchStrategy[str]:
    heads = st.sampled_from(
        (
            "data:image/png;base64,",
            "data:;base64,",
            "DATA:image/jpeg;BASE64,",
            "data:image/png,",
            "data:image/png;charset=utf-8;base64,",
            "data:",
            "data:image/png;base64",
        )
    )
    payload = st.one_of(
        image.map(lambda b: base64.b64encode(b).decode()),
        image.map(lambda b: base64.urlsafe_b64encode(b).decode()),
        image.map(lambda b: base64.b64encode(b).decode().rstrip("=")),
        image.map(lambda b: base64.b64encode(b).decode() + "\n"),
        st.text(max_size=64),
    )
    return st.builds(lambda h, p: h + p, heads, payload)


@functools.cache
def image_refs(image: st.SearchStrategy[bytes]) -> st.SearchStrategy[str]:
    return st.one_of(image_urls(), data_uris(image), st.text(max_size=40))
