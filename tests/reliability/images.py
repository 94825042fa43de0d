"""Image bytes for bad-input tests: valid tiny images (Pillow), files that declare huge
canvases in a few bytes (decompression bombs), truncated and polyglot files, and hypothesis
strategies that mutate all of these."""

from __future__ import annotations

import functools
import io
import struct
import zlib

from hypothesis import strategies as st
from PIL import Image

FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "AVIF")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@functools.cache
def tiny(fmt: str = "PNG", mode: str = "RGB", width: int = 40, height: int = 40) -> bytes:
    """A valid small image with structure (a gradient, a transparent half for alpha modes)."""
    img = Image.linear_gradient("L").resize((width, height)).convert(mode)
    if mode in ("RGBA", "LA"):
        alpha = Image.new("L", (width, height), 255)
        alpha.paste(0, (0, 0, width // 2, height))
        img.putalpha(alpha)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@functools.cache
def with_exif(fmt: str, tiff: bytes) -> bytes:
    """A small JPEG or WebP whose EXIF block is `tiff` (any bytes): EXIF is parsed, and the
    image turned by its orientation, before anything else."""
    img = Image.linear_gradient("L").resize((40, 40)).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format=fmt, exif=b"Exif\x00\x00" + tiff)
    return buf.getvalue()


VALID: tuple[bytes, ...] = ()


def valid_images() -> tuple[bytes, ...]:
    global VALID
    if not VALID:
        VALID = (
            tiny("PNG"),
            tiny("PNG", "RGBA"),
            tiny("PNG", "P"),
            tiny("PNG", "L", 32, 32),
            tiny("JPEG"),
            tiny("JPEG", "L", 64, 33),
            tiny("GIF", "P"),
            tiny("WEBP"),
            tiny("WEBP", "RGBA"),
            tiny("AVIF"),
            tiny("AVIF", "RGBA"),
        )
    return VALID


# -- files that declare a huge canvas in a few bytes ---------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(
    width: int,
    height: int,
    *,
    color_type: int = 2,
    bit_depth: int = 8,
    idat: bytes | None = None,
    extra: bytes = b"",
) -> bytes:
    """A PNG with any IHDR; `idat` None means a tiny deflate stream of zeros."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    data = zlib.compress(b"\0" * 64) if idat is None else idat
    return PNG_MAGIC + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def png_zlib_bomb(side: int = 4096) -> bytes:
    """A real, complete greyscale PNG of side x side zeros: megapixels inside limits whose
    IDAT inflates about 1000-fold."""
    row = b"\0" + b"\0" * side
    return png(side, side, color_type=0, idat=zlib.compress(row * side, 9))


def png_text_bomb(inflated: int = 64 * 1024 * 1024) -> bytes:
    """A small valid PNG with a zTXt chunk that inflates to `inflated` bytes."""
    text = b"Comment\0\0" + zlib.compress(b"\0" * inflated, 9)
    body = tiny("PNG")
    return body[:33] + _chunk(b"zTXt", text) + body[33:]


def png_iccp_bomb(inflated: int = 64 * 1024 * 1024) -> bytes:
    profile = b"icc\0\0" + zlib.compress(b"\0" * inflated, 9)
    body = tiny("PNG")
    return body[:33] + _chunk(b"iCCP", profile) + body[33:]


def apng_huge_frames() -> bytes:
    """An APNG (alpha, so it is decoded) claiming 2^31 frames, the first frame far larger
    than the 40x40 canvas."""
    actl = _chunk(b"acTL", struct.pack(">II", 2**31 - 1, 0))
    fctl = _chunk(b"fcTL", struct.pack(">IIIIIHHBB", 0, 60000, 60000, 0, 0, 1, 1, 0, 0))
    return png(40, 40, color_type=6, extra=actl + fctl)


def gif(screen: tuple[int, int], frame: tuple[int, int]) -> bytes:
    """A GIF whose logical screen and first frame have any sizes, with a tiny LZW stream."""
    head = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    desc = b"\x2c" + struct.pack("<HHHHB", 0, 0, *frame, 0)
    return head + desc + b"\x02\x02\x44\x01\x00" + b"\x3b"


def webp_vp8x(width: int, height: int) -> bytes:
    """A WebP extended header declaring a width x height canvas (each up to 2^24)."""
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x10\0\0\0"
    vp8x += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    payload = tiny("WEBP")[12:]  # the real image after its RIFF header
    body = b"WEBP" + vp8x + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def webp_vp8l(width: int, height: int) -> bytes:
    """A lossless WebP header declaring width x height (each up to 2^14), then nothing."""
    bits = (width - 1) | ((height - 1) << 14)
    vp8l = b"\x2f" + struct.pack("<I", bits) + b"\0" * 8
    chunk = b"VP8L" + struct.pack("<I", len(vp8l)) + vp8l
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def jpeg_sof(width: int, height: int) -> bytes:
    """A JPEG whose SOF0 declares width x height, cut after the frame header."""
    data = tiny("JPEG")
    at = data.index(b"\xff\xc0") + 5
    return data[:at] + struct.pack(">HH", height, width) + data[at + 4 :]


def avif_ispe(width: int, height: int) -> bytes:
    """A valid AVIF whose image spatial extents (ispe) are rewritten to width x height."""
    data = bytearray(tiny("AVIF"))
    at = data.index(b"ispe") + 8  # type, then version and flags
    data[at : at + 8] = struct.pack(">II", width, height)
    return bytes(data)


@functools.cache
def bombs() -> dict[str, bytes]:
    return {
        "png-50000x50000": png(50000, 50000),
        "png-rgba16-20000x20000": png(20000, 20000, color_type=6, bit_depth=16),
        "png-4096x4096-no-pixels": png(4096, 4096, color_type=6),
        "png-1x100000": png(1, 100000),
        "png-2^31-1-square": png(2**31 - 1, 2**31 - 1),
        "png-zero-size": png(0, 0),
        "png-ztxt-64MiB": png_text_bomb(),
        "png-iccp-64MiB": png_iccp_bomb(),
        "apng-huge-frames": apng_huge_frames(),
        "gif-screen-65535": gif((65535, 65535), (1, 1)),
        "gif-frame-65535": gif((40, 40), (65535, 65535)),
        "gif-zero-screen": gif((0, 0), (0, 0)),
        "webp-vp8x-16M-canvas": webp_vp8x(2**24, 2**24),
        "webp-vp8x-16384": webp_vp8x(16384, 16384),
        "webp-vp8l-16384": webp_vp8l(16384, 16384),
        "jpeg-65500x65500": jpeg_sof(65500, 65500),
        "jpeg-0x0": jpeg_sof(0, 0),
        "avif-ispe-65535": avif_ispe(65535, 65535),
        "avif-ispe-0": avif_ispe(0, 0),
    }


# -- truncated and polyglot files -----------------------------------------------------------


# What a polyglot smuggles: none of it may ride along in an upscaled image.
POLYGLOT_PAYLOADS = (b"<script", b"<html", b"PK\x03\x04", b"rm -rf", b"alert(")


@functools.cache
def polyglots() -> dict[str, bytes]:
    zip_tail = b"PK\x03\x04" + b"\x14\0\0\0\0\0" + b"\0" * 20 + b"evil.sh#!/bin/sh\nrm -rf /\n"
    html = b"<html><script>alert(document.cookie)</script></html>"
    jpeg = tiny("JPEG")
    return {
        "png+zip": tiny("PNG") + zip_tail,
        "png+html": tiny("PNG") + html,
        "png-rgba+html": tiny("PNG", "RGBA") + html,
        "png-html-chunk": tiny("PNG")[:33] + _chunk(b"tEXt", b"x\0" + html) + tiny("PNG")[33:],
        "gif-js": b"GIF89a/*" + tiny("GIF", "P")[8:] + b"*/=alert(1);",
        "jpeg-com-html": jpeg[:2]
        + b"\xff\xfe"
        + struct.pack(">H", len(html) + 2)
        + html
        + jpeg[2:],
        "jpeg+zip": jpeg + zip_tail,
        "webp+html": tiny("WEBP") + html,
        "html-then-png": html + tiny("PNG"),
        "pdf-with-png": b"%PDF-1.7\n" + tiny("PNG"),
        "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"/>',
        "zip": zip_tail,
    }


@functools.cache
def truncations() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for fmt in FORMATS:
        data = tiny(fmt)
        for cut in (4, 8, 16, 32, len(data) // 2, len(data) - 1):
            out[f"{fmt.lower()}-first-{cut}"] = data[:cut]
    out["avif-zeroed-tail"] = tiny("AVIF")[:-64] + b"\0" * 64
    return out


# -- strategies -----------------------------------------------------------------------------


def _flip(data: bytes, at: list[int], values: list[int]) -> bytes:
    out = bytearray(data)
    for i, v in zip(at, values, strict=False):
        out[i % len(out)] = v
    return bytes(out)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid image with a few bytes changed, a slice cut, or bytes spliced in."""
    base = draw(st.sampled_from(valid_images()))
    how = draw(st.sampled_from(("flip", "truncate", "splice", "int32", "zero-tail")))
    if how == "flip":
        n = draw(st.integers(1, 8))
        at = draw(st.lists(st.integers(0, len(base) - 1), min_size=n, max_size=n))
        return _flip(base, at, draw(st.lists(st.integers(0, 255), min_size=n, max_size=n)))
    if how == "truncate":
        return base[: draw(st.integers(0, len(base) - 1))]
    if how == "splice":
        at = draw(st.integers(0, len(base)))
        return base[:at] + draw(st.binary(min_size=1, max_size=64)) + base[at:]
    if how == "int32":
        at = draw(st.integers(0, len(base) - 4))
        word = draw(st.sampled_from((b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\0\0\0\0")))
        return base[:at] + word + base[at + 4 :]
    keep = draw(st.integers(16, len(base)))
    return base[:keep] + b"\0" * (len(base) - keep)


@functools.cache
def header_only() -> st.SearchStrategy[bytes]:
    side = st.integers(0, 2**31 - 1) | st.integers(0, 70000)
    small = st.integers(0, 65535)
    return st.one_of(
        st.builds(lambda w, h: png(w, h), side, side),
        st.builds(
            lambda w, h, t: png(w, h, color_type=t),
            small,
            small,
            st.sampled_from((0, 2, 3, 4, 6, 7)),
        ),
        st.builds(lambda s, f: gif(s, f), st.tuples(small, small), st.tuples(small, small)),
        st.builds(webp_vp8x, st.integers(1, 2**24), st.integers(1, 2**24)),
        st.builds(webp_vp8l, st.integers(1, 2**14), st.integers(1, 2**14)),
        st.builds(jpeg_sof, small, small),
        st.builds(avif_ispe, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    )


@functools.cache
def exif_images() -> st.SearchStrategy[bytes]:
    tiff = st.one_of(
        st.binary(max_size=96),
        st.builds(lambda b: b"MM\0*\0\0\0\x08" + b, st.binary(max_size=96)),
        st.builds(lambda b: b"II*\0\x08\0\0\0" + b, st.binary(max_size=96)),
    )
    return st.builds(with_exif, st.sampled_from(("JPEG", "WEBP")), tiff)


@functools.cache
def magic_then_noise() -> st.SearchStrategy[bytes]:
    magics = (PNG_MAGIC, b"\xff\xd8\xff", b"GIF89a", b"GIF87a", b"RIFF\0\0\0\0WEBP")
    avif = b"\0\0\0\x1cftypavif\0\0\0\0avifmif1miaf"
    return st.builds(
        lambda m, tail: m + tail, st.sampled_from((*magics, avif)), st.binary(max_size=256)
    )


@functools.cache
def any_image_bytes() -> st.SearchStrategy[bytes]:
    named = {**bombs(), **polyglots(), **truncations()}
    return st.one_of(
        st.sampled_from(valid_images()),
        mutated(),
        header_only(),
        exif_images(),
        magic_then_noise(),
        st.sampled_from(list(named.values())),
        st.binary(max_size=512),
        st.just(b""),
    )
