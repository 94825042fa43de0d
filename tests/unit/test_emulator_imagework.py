"""The emulated model's output (adapters/emulators/imagework.py)."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

from adapters.emulators.imagework import upscale
from tests.conftest import make_image


def test_native_x1_of_an_opaque_png_is_the_image_as_sent() -> None:
    """What the model would send back already: the emulator spends nothing re-encoding it
    (bench/scale.py runs the emulator at x1, on a core it shares with the load)."""
    png = make_image(64, 48)
    out = upscale(png, 1, 4096, "png")
    assert out.data == png and (out.width, out.height) == (64, 48)


def test_anything_else_is_drawn_again() -> None:
    rgba = make_image(64, 48, mode="RGBA")
    flat = upscale(rgba, 1, 4096, "png")
    assert Image.open(io.BytesIO(flat.data)).mode == "RGB"  # opaque, as the providers send
    jpeg = make_image(64, 48, fmt="JPEG")
    assert Image.open(io.BytesIO(upscale(jpeg, 1, 4096, "png").data)).format == "PNG"
    x4 = upscale(make_image(64, 48), 4, 4096, "png")
    assert (x4.width, x4.height) == (256, 192)
    capped = upscale(make_image(64, 48), 4, 128, "png")
    assert (capped.width, capped.height) == (128, 96)


def deep_png(width: int, height: int) -> bytes:
    """An opaque 16-bit-per-sample PNG (Pillow opens it as mode "RGB" too)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    rows = b"".join(b"\x00" + b"\x9c\x40" * 3 * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_a_16_bit_png_comes_back_at_8_bits_as_from_the_model() -> None:
    deep = deep_png(40, 40)
    assert Image.open(io.BytesIO(deep)).mode == "RGB"
    out = upscale(deep, 1, 4096, "png")
    assert out.data != deep and out.data[24] == 8
